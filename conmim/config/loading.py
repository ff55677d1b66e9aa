"""Loading an experiment: YAML (or a preset) -> ``extends`` -> ``--set dotted.key=value`` ->
validation. Every way a config can be wrong surfaces as :class:`ConfigError`, one paragraph naming
the dotted key, the bad value and what is allowed.

YAML is read with a safe loader that also refuses alias bombs, recursive aliases and duplicate keys."""
from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from conmim.config.errors import ConfigError
from conmim.config.experiment import ExperimentConfig

# keys that moved, so that an old config is told where its key went
MOVED_KEYS = {"pretrain.max_failures": "resources.max_failures"}

def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("conmim.config.presets").iterdir() if p.name.endswith(".yaml"))


MAX_YAML_NODES = 100_000  # a config has a few hundred values; alias expansion beyond this is a "YAML bomb"


class YAMLRefused(yaml.YAMLError):
    """Well-formed YAML that a config may not be (bomb, recursion, duplicate key)."""


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also refuses alias bombs, recursive aliases and duplicate keys.

    The size check runs on the composed node graph, before any Python object is built: an alias
    costs its whole subtree again, counted with memoisation, so a "billion laughs" document is
    refused after visiting each distinct node once."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_nodes(node)
        return node


def _check_nodes(root) -> None:
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node) -> int:
        k = id(node)
        if k in sizes:
            return sizes[k]
        if k in active:
            raise YAMLRefused(f"line {node.start_mark.line + 1}: an alias refers to its own anchor "
                              f"(recursive structure); configs must be trees")
        active.add(k)
        n = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in seen:
                        raise YAMLRefused(f"line {key.start_mark.line + 1}: duplicate key '{key.value}' "
                                          f"(first at line {seen[key.value]}); each key may appear once")
                    seen[key.value] = key.start_mark.line + 1
                n += size(key) + size(value)
                if n > MAX_YAML_NODES:
                    break
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                n += size(item)
                if n > MAX_YAML_NODES:
                    break
        active.discard(k)
        if n > MAX_YAML_NODES:
            raise YAMLRefused(f"line {node.start_mark.line + 1}: the document expands to more than "
                              f"{MAX_YAML_NODES} values through anchors/aliases (a 'YAML bomb'); "
                              f"a config needs at most a few hundred")
        sizes[k] = n
        return n

    size(root)


def read_yaml(path: str | Path) -> dict:
    """Safe-load a YAML mapping; every failure is a ConfigError naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the file ({e.strerror}).") from None
    if len(raw) > 1_000_000:
        raise ConfigError(f"{path}: {len(raw)} bytes is too large for a config (limit 1 MB).")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8.") from None
    try:
        data = yaml.load(text, Loader=ConfigLoader)  # a SafeLoader: plain data only, no Python objects
    except YAMLRefused as e:
        raise ConfigError(f"{path}: {e}.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}.") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply; a config needs a few levels of mappings.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}.")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_source(source: str, _seen: tuple = ()) -> tuple[dict, str]:
    """A preset name or a YAML path -> (raw dict, label used in messages).

    A file may start from another with ``extends: <preset or path>`` and change only some keys."""
    raw, label = _load_one(source)
    parent = raw.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str) or parent in _seen or len(_seen) > 8:
            raise ConfigError(f"{label}: 'extends' = {parent!r} must name a preset or file, without cycles.")
        if not parent.startswith("/") and not label.startswith("preset") and parent not in preset_names():
            parent = str(Path(label).parent / parent)
        try:
            base, _ = load_source(parent, _seen + (source,))
        except ConfigError as e:
            raise ConfigError(f"{label}: extends: {e}") from None
        raw = deep_merge(base, raw)
    return raw, label


def _load_one(source: str) -> tuple[dict, str]:
    if source in preset_names():
        text = resources.files("conmim.config.presets").joinpath(f"{source}.yaml").read_text()
        return (yaml.safe_load(text) or {}), f"preset '{source}'"
    p = Path(source)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"{source}: no such config file.")
        return read_yaml(p), str(p)
    raise ConfigError(f"'{source}' is neither a config file nor a preset; presets are: {', '.join(preset_names())}.")


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set objective.temperature=0.2.")
    key, value = item.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def set_dotted(data: dict, key: str, value: Any, *, label: str = "override") -> None:
    """Write data[a][b][c] = value for key 'a.b.c', refusing keys the schema does not know."""
    parts = key.split(".")
    node: Any = data
    model: Any = ExperimentConfig
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            if key in MOVED_KEYS:
                raise ConfigError(f"{label}: '{key}' is now '{MOVED_KEYS[key]}'; set that key instead.")
            allowed = ", ".join(sorted(fields)) if fields else "(no sub-keys)"
            prefix = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"{label}: unknown key '{key}' ('{part}' is not a key of {prefix}); allowed: {allowed}.")
        if i == len(parts) - 1:
            node[part] = value
            return
        ann = fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        child = node.get(part)
        if isinstance(child, bool) and part == "masking":
            child = {"enabled": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child


def build(raw: dict, overrides: dict[str, Any] | None = None, *, label: str = "config",
          check_paths: bool = True) -> ExperimentConfig:
    data = copy.deepcopy(raw)
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value, label=label)
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, label)) from None
    if check_paths:
        check_data_paths(cfg, label)
    return cfg


def load_config(source: str, overrides: list[str] | dict[str, Any] | None = None, *,
                check_paths: bool = True) -> ExperimentConfig:
    raw, label = load_source(source)
    if isinstance(overrides, (list, tuple)):
        overrides = dict(parse_override(o) for o in overrides)
    return build(raw, overrides, label=label, check_paths=check_paths)


def check_data_paths(cfg: ExperimentConfig, label: str) -> None:
    from conmim.config.data_paths import missing_data_message
    msg = missing_data_message(cfg.data)
    if msg:
        raise ConfigError(f"{label}: {msg}")


def format_validation_error(e: ValidationError, label: str, schema: Any = None) -> str:
    """One paragraph: for each problem the dotted key, the bad value and what is allowed."""
    schema = schema or ExperimentConfig
    lines = []
    errors = [{**err, "loc": _clean_loc(err["loc"]), "branch": err["loc"] != _clean_loc(err["loc"])} for err in e.errors()]
    for err in errors:
        if err["branch"] and err["type"].endswith("_type") and any(
                o is not err and o["loc"][:len(err["loc"])] == err["loc"] and not o["type"].endswith("_type") for o in errors):
            continue  # 'base' as a string failed, as a mapping it has a real problem: show that one
        if err["branch"] and err["type"].startswith("bool_") and any(
                o["loc"] == err["loc"] and o["type"] == "literal_error" for o in errors):
            continue  # true/false or a named mode (pretrain.compile): the literal's line names both
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        value = err.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        kind = err["type"]
        if kind == "extra_forbidden" and key in MOVED_KEYS:
            lines.append(f"'{key}' is now '{MOVED_KEYS[key]}'")
        elif kind == "extra_forbidden":
            lines.append(f"unknown key '{key}' ({_allowed_keys(err['loc'], schema)})")
        elif kind == "literal_error":
            also = "true, false, " if err["branch"] and any(
                o["loc"] == err["loc"] and o["type"].startswith("bool_") for o in errors) else ""
            lines.append(f"'{key}' = {shown} is not allowed; "
                         f"{err['msg'].replace('Input should be ', 'allowed: ' + also)}")
        elif kind == "value_error":
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(msg if not err["loc"] or key in msg else f"{key}: {msg}")
        else:
            lines.append(f"'{key}' = {shown}: {err['msg']}")
    return f"{label}: invalid configuration: " + "; ".join(lines) + "."


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-branch tags ('str', 'BaseSpec') from an error location."""
    return tuple(p for p in loc if not (isinstance(p, str) and (p[:1].isupper() or p in ("str", "int", "float", "bool")
                                                                or p.startswith("literal["))))


def _unwrap_union(ann: Any) -> Any:
    """Optional[X] / Union[str, Model] -> the member that can hold sub-keys (a model first)."""
    import typing
    if typing.get_origin(ann) is not typing.Union:
        return ann
    members = [a for a in typing.get_args(ann) if a is not type(None)]
    return next((a for a in members if isinstance(a, type) and issubclass(a, BaseModel)), members[0] if members else ann)


def _allowed_keys(loc: tuple, schema: Any = None) -> str:
    """The keys allowed where ``loc`` points, following models, lists and dicts of the schema."""
    import typing
    ann: Any = schema or ExperimentConfig
    for part in loc[:-1]:
        ann = _unwrap_union(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(part, str) and part in ann.model_fields:
            ann = ann.model_fields[part].annotation
        elif typing.get_origin(ann) in (list, tuple) and isinstance(part, int):
            ann = typing.get_args(ann)[0]
        elif typing.get_origin(ann) is dict and isinstance(part, str):
            ann = typing.get_args(ann)[1]
        else:
            return "not a key of the schema"
    ann = _unwrap_union(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "allowed here: " + ", ".join(sorted(ann.model_fields))
    return "not a key of the schema"
