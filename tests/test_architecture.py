"""The package's shape, checked on its source: data flows one way through the layers (an earlier
layer never imports a later one, fine-tuning never imports pre-training), no private name crosses
a module boundary, no module grows past ~350 lines, and the Tune trial's side stays torch-free."""
import ast
from pathlib import Path

import pytest

from conftest import REPO

PKG = REPO / "conmim"
# Earlier layers first; a module may import its own layer and earlier ones only.
LAYERS = [
    ("conmim", "conmim.metrics", "conmim.files", "conmim.failures"),
    ("conmim.config",),
    ("conmim.data",),
    ("conmim.method",),
    ("conmim.train",),
    ("conmim.trial",),
    ("conmim.tracking",),
    ("conmim.stats", "conmim.report"),
    ("conmim.run",),
    ("conmim.cli",),
]
MAX_LINES = 350


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in sorted(PKG.rglob("*.py"))}


def _layer(name: str) -> int:
    best = None  # the longest matching prefix decides ("conmim" alone is the package root)
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    if best is not None:
        return best[0]
    raise AssertionError(f"{name} is in no layer of tests/test_architecture.py")


def _imports(path: Path):
    """(imported module, imported names) for every conmim import in the file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("conmim"):
                    yield a.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("conmim") and node.level == 0:
            yield node.module, [a.name for a in node.names]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_flow_one_way(name):
    mine = _layer(name)
    for target, names in _imports(MODULES[name]):
        # `from conmim.data import rng` imports the module conmim.data.rng: judge that one
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES] or [target]
        for t in subs:
            assert _layer(t) <= mine, f"{name} (layer {mine}) imports {t} (layer {_layer(t)}), a later layer"


def test_finetuning_does_not_import_pretraining():
    assert not [t for t, _ in _imports(MODULES["conmim.train.finetune"]) if t == "conmim.train.pretrain"]
    assert not [t for t, _ in _imports(MODULES["conmim.train.pretrain"]) if t == "conmim.train.finetune"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_crosses_a_module(name):
    for target, names in _imports(MODULES[name]):
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{name} imports private {private} from {target}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{name} has {n} lines (> {MAX_LINES}): split it by concept"


def test_the_tune_trials_side_imports_no_torch_at_module_level():
    """conmim.trial, the results table and the Tune trial import torch only inside functions."""
    for name in ("conmim.trial", "conmim.run.results", "conmim.run.tune_trial", "conmim.failures", "conmim.metrics",
                 "conmim.config.expand"):
        tree = ast.parse(MODULES[name].read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        mods = [a.name for n in top if isinstance(n, ast.Import) for a in n.names] + \
               [n.module for n in top if isinstance(n, ast.ImportFrom) and n.module]
        heavy = [m for m in mods if m.split(".")[0] in ("torch", "timm", "torchvision") or
                 any(m == p or m.startswith(p + ".") for p in ("conmim.data", "conmim.method", "conmim.train"))]
        assert not heavy, f"{name} imports {heavy} at module level"
