"""A sweep file expanded into trials: variants x grid x seeds, each a validated experiment.
Trials that are the same experiment (``canonical()``) run once; the others become aliases of the
first. Also the sweep folder's pre-flight (writable, not full, no escape from ``storage``)."""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from conmim.config.errors import ConfigError
from conmim.config.experiment import ExperimentConfig
from conmim.config.identity import canonical_hash
from conmim.config.loading import build, format_validation_error, load_source, parse_override, read_yaml, set_dotted
from conmim.config.sweep import SweepConfig, Variant
from conmim.config.uris import absolute_uri


def check_storage(d: Path, min_free_gb: float) -> None:
    """Pre-flight of the sweep folder: it can be created and written, and its filesystem has at
    least ``min_free_gb`` free (checkpoints, Ray state and results go there); else ConfigError."""
    import shutil
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".write-test"
        probe.write_bytes(b"x" * 1024)
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"storage: cannot write the sweep folder {d} ({e.strerror or e}); "
                          f"choose a writable 'storage'.") from None
    free = shutil.disk_usage(d).free
    if free < min_free_gb * 1e9:
        raise ConfigError(f"storage: only {free / 1e9:.2f} GB free on the filesystem of {d}, below min_free_gb = "
                          f"{min_free_gb:g}; free some space, choose another 'storage', or lower 'min_free_gb'.")


def safe_child(root: Path, *parts: str) -> Path:
    """``root/parts...``, refused (ConfigError) when a part would lead outside ``root``: names
    taken from configs ('..', absolute paths, separators) cannot make the project write elsewhere."""
    root = Path(root).resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents or path == root and parts:
        raise ConfigError(f"{'/'.join(parts)!r} leads outside {root}; names used as folders may not contain "
                          f"'..' or '/' or be absolute.")
    return path


@dataclass
class Trial:
    name: str                  # variant (+ grid values) + seed: the MLflow run name
    variant: str
    seed: int
    overrides: dict[str, Any]  # relative to the base (without seed)
    config: ExperimentConfig
    key: str                   # canonical hash: equal keys = same experiment
    alias_of: Optional[str] = None
    note: str = ""
    arm: str = ""              # the variant (baseline or a variant's name), without grid values
    setting: dict[str, Any] = field(default_factory=dict)  # its grid (or selection budget) values


@dataclass
class Sweep:
    spec: SweepConfig
    path: Path
    base_raw: dict
    trials: list[Trial]
    stage: str = ""            # "selection" for the selection stage of a two-stage sweep

    @property
    def distinct(self) -> list[Trial]:
        return [t for t in self.trials if t.alias_of is None]

    @property
    def aliases(self) -> list[Trial]:
        return [t for t in self.trials if t.alias_of is not None]

    @property
    def dir(self) -> Path:
        return safe_child(Path(self.spec.storage).resolve(), self.spec.name)

    @property
    def tracking_uri(self) -> str:
        return absolute_uri(self.spec.tracking_uri)  # Ray workers and `conmim ui` run elsewhere

    @property
    def experiment(self) -> str:
        return self.spec.experiment


def trial_config(base_raw: dict, spec: SweepConfig, overrides: dict, seed: int, label: str,
                 check_paths: bool = True) -> ExperimentConfig:
    """One trial's experiment: the base, base.set, the sweep's resources, the variant/grid
    overrides, the seed (the schema refuses a key set in two of these places)."""
    merged = {**spec.base_spec.set, **spec.resource_overrides(), **overrides, "seed": seed}
    return build(base_raw, merged, label=label, check_paths=check_paths)


def _value_name(v: Any) -> str:
    s = str(v).lower() if isinstance(v, bool) else str(v)
    return re.sub(r"[^A-Za-z0-9_.+-]", "", s)


def _apply_sets(sweep_path: str, sets: list[str]) -> dict:
    """``--set`` on a sweep: keys of the sweep file (name, seeds, storage, base, ...)."""
    raw = read_yaml(sweep_path)
    for item in sets:
        key, value = parse_override(item)
        if key.startswith("base.set."):
            # base.set holds dotted experiment keys: "base.set.data.root=X" sets the key "data.root"
            if isinstance(raw.get("base"), str):
                raw["base"] = {"config": raw["base"]}
            base = raw.setdefault("base", {})
            if not isinstance(base, dict):
                raise ConfigError(f"--set {item}: 'base' is not a section of the sweep file")
            base.setdefault("set", {})[key[len("base.set."):]] = value
            continue
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if p not in node or node[p] is None else node[p]
                if not isinstance(node[p], dict):
                    raise ConfigError(f"--set {item}: '{p}' is not a section of the sweep file")
            node = node[p]
        node[parts[-1]] = value
    return raw


def load_sweep(path: str, sets: list[str] | None = None, check_paths: bool = True,
               chosen: Optional[dict[str, dict]] = None) -> Sweep:
    """Parse, validate and expand a sweep file; every problem is a ConfigError (exit 2).
    ``check_paths=False``: every check but the dataset's paths (a cluster sweep's data is on the
    cluster, not here). ``chosen``: with a ``selection`` section, each arm's setting chosen in the
    selection stage (:mod:`conmim.run.selection`); without it, the first setting of the budget
    stands in, so that every check runs before anything starts."""
    raw = _apply_sets(path, sets or [])
    try:
        spec = SweepConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"{path} (sweep)", SweepConfig)) from None
    base_src = spec.base_spec.config
    if not Path(base_src).is_absolute() and (Path(path).parent / base_src).exists():
        base_src = str(Path(path).parent / base_src)
    try:
        base_raw, base_label = load_source(base_src)
    except ConfigError as e:
        raise ConfigError(f"{path}: base: {e}") from None
    # every override key must exist in the experiment schema, named with its variant
    for key in spec.base_spec.set:
        set_dotted({}, key, None, label=f"{path}: base.set")
    for v in spec.variants:
        for key in v.set:
            set_dotted({}, key, None, label=f"{path}: variant '{v.name}'")
    for key in spec.grid:
        set_dotted({}, key, None, label=f"{path}: grid")
    if spec.search == "optuna":
        for key in spec.optuna.space:
            set_dotted({}, key, None, label=f"{path}: optuna.space")
    if spec.selection is not None:
        for key in spec.selection.budget:
            set_dotted({}, key, None, label=f"{path}: selection.budget")
    sweep = Sweep(spec, Path(path), base_raw, [])
    first = {k: vals[0] for k, vals in spec.selection.budget.items()} if spec.selection else {}
    _expand(sweep, spec.grid, spec.seeds, {a: (chosen or {}).get(a, first) for a in arms(spec)}, check_paths)
    labels = list(dict.fromkeys(t.variant for t in sweep.trials))
    if "baseline" in spec.report.model_fields_set and spec.search != "optuna" and spec.report.baseline not in labels:
        raise ConfigError(f"{path} (sweep): invalid configuration: report.baseline = {spec.report.baseline!r} is not a "
                          f"variant of this sweep; allowed: {', '.join(labels)}.")
    if spec.search == "optuna":
        # the sampled trials are created by Optuna at run time; the expansion holds the base only
        sweep.trials = [t for t in sweep.trials if t.variant == "baseline"][:1]
    return sweep


def arms(spec: SweepConfig) -> list[str]:
    """The arms a sweep compares: the baseline, then its variants (``only`` keeps some)."""
    return ["baseline"] + [v.name for v in spec.variants if spec.only is None or v.name in spec.only]


def _expand(sweep: Sweep, grid: dict[str, list], seeds: list[int], per_arm: dict[str, dict], check_paths: bool) -> None:
    """Arms x grid x seeds as trials of ``sweep``; ``per_arm``: overrides of one arm only (its
    chosen setting). Trials that are the same experiment become aliases of the first."""
    spec, path = sweep.spec, sweep.path
    grid_keys = list(grid)
    combos = list(itertools.product(*(grid[k] for k in grid_keys))) or [()]
    named = {v.name: v for v in spec.variants}
    seen: dict[str, str] = {}
    for arm in arms(spec):
        v = named.get(arm) or Variant(name="baseline", note="the base configuration")
        for combo in combos:
            gvals = dict(zip(grid_keys, combo))
            label = v.name + "".join(f"_{k.split('.')[-1]}={_value_name(x)}" for k, x in gvals.items())
            for seed in seeds:
                overrides = {**v.set, **per_arm.get(arm, {}), **gvals}
                cfg = trial_config(sweep.base_raw, spec, overrides, seed, f"{path}: variant '{v.name}'", check_paths)
                key = canonical_hash(cfg)
                name = f"{label}_seed{seed}"
                sweep.trials.append(Trial(name, label, seed, overrides, cfg, key, seen.get(key), v.note, arm, gvals))
                seen.setdefault(key, name)


def selection_stage(sweep: Sweep, check_paths: bool = True) -> Sweep:
    """The selection stage of a sweep with a ``selection`` section: every arm at every setting of
    the budget on the selection seeds, as a sweep of its own (``NAME.selection``: its own folder,
    MLflow experiment and parent run), selecting on ``selection.metric`` (validation only)."""
    sel = sweep.spec.selection
    # selection reads the validation split only: its trials never evaluate on the test split (no
    # probes, no test top-1), so the test split is touched once, by the comparison
    base = sweep.spec.base_spec.model_copy(update={"set": {**sweep.spec.base_spec.set, "eval.test_split": False}})
    spec = sweep.spec.model_copy(update={
        "name": f"{sweep.spec.name}.selection", "seeds": sel.seeds, "selection": None, "base": base,
        "mlflow": sweep.spec.mlflow.model_copy(update={"experiment": f"{sweep.spec.experiment}.selection"})})
    stage = Sweep(spec, sweep.path, sweep.base_raw, [], stage="selection")
    _expand(stage, sel.budget, sel.seeds, {}, check_paths)
    return stage


def trial_table(sweep: Sweep) -> str:
    rows = [("trial", "variant", "seed", "overrides", "alias_of")]
    for t in sweep.trials:
        ov = ", ".join(f"{k}={v}" for k, v in t.overrides.items()) or "-"
        rows.append((t.name, t.variant, str(t.seed), ov, t.alias_of or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
