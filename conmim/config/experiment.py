"""The experiment configuration: one typed model, the single source of truth for every knob.

Loading goes YAML (or a preset name) -> ``--set dotted.key=value`` overrides -> validation.
Every way a config can be wrong surfaces as :class:`ConfigError`, one paragraph naming the
dotted key, the bad value and what is allowed; the CLI turns it into exit code 2.
"""
from __future__ import annotations

import copy
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration the user must fix; the message is meant to be shown as is."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(Strict):
    name: Literal["fashion-mnist", "imagefolder", "parquet"] = "fashion-mnist"
    root: Optional[str] = Field(None, description="folder (fashion-mnist idx files, imagefolder) or .parquet file / folder")
    download: bool = Field(False, description="fashion-mnist only: fetch with torchvision when the files are absent (needs internet)")
    subset: Optional[int] = Field(None, ge=1, description="use only the first N training images (after the fixed shuffle)")
    eval_subset: Optional[int] = Field(None, ge=1, description="use only the first N validation and test images")
    val_size: int = Field(5000, ge=0, description="images held out of the training split for validation")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per Ray Train worker")


class ModelConfig(Strict):
    name: str = Field("vit_small_patch16_224", description="any timm ViT (vit_*, deit_*) or BEiT (beit_*) by name")
    img_size: int = Field(224, ge=8)
    patch_size: int = Field(16, ge=1)
    embed_dim: Optional[int] = Field(None, ge=8)
    depth: Optional[int] = Field(None, ge=1)
    num_heads: Optional[int] = Field(None, ge=1)
    layer_scale_init: Optional[float] = Field(None, gt=0, description="BEiT layer-scale init (0.1 for ViT-S/B)")
    shared_rel_pos_bias: bool = Field(False, description="BEiT models only: one relative position bias shared by all blocks")
    projector_hidden: int = Field(4096, ge=1)
    projector_out: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _patches_tile_image(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"model.patch_size={self.patch_size} must divide model.img_size={self.img_size}")
        if self.embed_dim and self.num_heads and self.embed_dim % self.num_heads:
            raise ValueError(f"model.num_heads={self.num_heads} must divide model.embed_dim={self.embed_dim}")
        return self

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


class MaskingConfig(Strict):
    enabled: bool = Field(True, description="false = no corruption: every patch is predicted from the unmasked view")
    type: Literal["block", "random", "random_cells"] = "block"
    ratio: float = Field(75 / 196, gt=0, lt=1)
    min_block_patches: int = Field(16, ge=1, description="block masking: smallest block, in patches")
    cell_size: int = Field(2, ge=1, description="random_cells: a cell is cell_size x cell_size patches")


class AugmentConfig(Strict):
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = Field(0.5, ge=0, le=1)
    jitter_p: float = Field(0.8, ge=0, le=1)
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.2, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    blur_p: float = Field(0.1, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = Field(0.2, ge=0, le=1)


class ObjectiveConfig(Strict):
    target_encoder: Literal["momentum", "shared"] = "momentum"
    stop_grad: bool = True
    perturbation: Literal["asymmetric", "symmetric_basic", "symmetric_strong", "switched"] = "asymmetric"
    temperature: float = Field(0.1, gt=0)
    momentum: Optional[float] = Field(0.996, ge=0, lt=1, description="start of the cosine schedule to 1.0")
    dictionary: Literal["image", "batch"] = Field(
        "image",
        description="negatives: other patches of the same image, or every patch of every image "
        "on this worker (with several Ray Train workers this is the paper's 'intra-GPU' dictionary)",
    )


class PretrainConfig(Strict):
    enabled: bool = Field(True, description="false = the paper's 'from scratch' row: fine-tune a random encoder")
    epochs: int = Field(300, ge=0)
    batch_size: int = Field(2048, ge=1, description="global batch, split over the Ray Train workers")
    lr: float = Field(5e-4, gt=0)
    lr_batch_size: int = Field(2048, ge=1, description="lr is given for this global batch and scales linearly")
    min_lr: float = Field(1e-5, ge=0)
    warmup_epochs: float = Field(5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    clip_grad: Optional[float] = Field(None, gt=0)
    amp: bool = Field(False, description="bf16 autocast (GPU)")
    compile: bool = False
    sync_bn: bool = Field(False, description="SyncBatchNorm in the projectors (the reference uses per-worker BN)")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    max_failures: int = Field(2, ge=0, description="worker failures Ray Train recovers from")


class FinetuneConfig(Strict):
    epochs: int = Field(100, ge=0)
    batch_size: int = Field(1024, ge=1)
    lr: float = Field(4e-3, gt=0)
    lr_batch_size: int = Field(1024, ge=1)
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(20, ge=0)
    layer_decay: float = Field(0.65, gt=0, le=1)
    drop_path: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.05, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mixup: float = Field(0.8, ge=0)
    cutmix: float = Field(1.0, ge=0)
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="random resized crop scale of the labelled images")
    randaug: Optional[str] = Field("rand-m9-mstd0.5-inc1", description="timm RandAugment spec, null for none")
    random_erasing: float = Field(0.25, ge=0, le=1)
    encoder: Literal["momentum", "online"] = Field("momentum", description="which pre-trained encoder to fine-tune")


class EvalConfig(Strict):
    linear_probe: bool = True
    probe_epochs: int = Field(30, ge=1)
    knn: bool = True
    knn_k: int = Field(20, ge=1)
    proxy_every: int = Field(0, ge=0, description="k-NN proxy on the validation split every N pre-training epochs (0 = off)")


class ResourcesConfig(Strict):
    num_workers: int = Field(1, ge=1, description="Ray Train workers per trial")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    threads_per_worker: Optional[int] = Field(None, ge=1, description="torch intra-op threads (default: cpus_per_worker)")


class DebugConfig(Strict):
    """Fault injection for tests of recovery; leave unset in real runs."""
    crash_at_step: Optional[int] = Field(None, ge=0, description="a worker calls os._exit at this global step, once")
    kill_at_step: Optional[int] = Field(None, ge=0, description="a worker sends itself SIGKILL at this global step, once")
    nan_at_step: Optional[int] = Field(None, ge=0, description="the loss becomes NaN at this step")
    log_steps: bool = Field(False, description="record the loss of every step in result.json")
    dump_replicas: bool = Field(False, description="every worker saves its final weights to out/replicas/ (to check replicas agree)")
    float64: bool = Field(False, description="pre-train in float64, so that runs which differ only in float32 "
                          "reduction order (1 vs 2 workers) can be compared step by step")


class ExperimentConfig(Strict):
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    masking: MaskingConfig = MaskingConfig()
    augment: AugmentConfig = AugmentConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    eval: EvalConfig = EvalConfig()
    resources: ResourcesConfig = ResourcesConfig()
    debug: DebugConfig = DebugConfig()

    @model_validator(mode="before")
    @classmethod
    def _masking_false_shorthand(cls, data: Any):
        if isinstance(data, dict) and isinstance(data.get("masking"), bool):
            data = {**data, "masking": {"enabled": data["masking"]}}
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if self.data.name == "imagefolder" and not self.data.root:
            raise ValueError("data.root is required for data.name=imagefolder (the folder holding train/ and val/)")
        if self.data.name == "parquet" and not self.data.root:
            raise ValueError("data.root is required for data.name=parquet (a .parquet file or a folder of them)")
        if self.resources.use_gpu and self.resources.gpus_per_worker == 0:
            raise ValueError("resources.gpus_per_worker must be > 0 when resources.use_gpu is true")
        if self.pretrain.batch_size % self.resources.num_workers:
            raise ValueError(
                f"pretrain.batch_size={self.pretrain.batch_size} must be divisible by "
                f"resources.num_workers={self.resources.num_workers} (it is the global batch)")
        if self.finetune.batch_size % self.resources.num_workers:
            raise ValueError(
                f"finetune.batch_size={self.finetune.batch_size} must be divisible by "
                f"resources.num_workers={self.resources.num_workers} (it is the global batch)")
        return self

    # -- views ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        return flatten(self.to_dict())


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("conmim.presets").iterdir() if p.name.endswith(".yaml"))


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
        text = resources.files("conmim.presets").joinpath(f"{source}.yaml").read_text()
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
    from conmim.data_paths import missing_data_message
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
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        value = err.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        kind = err["type"]
        if kind == "extra_forbidden":
            lines.append(f"unknown key '{key}' ({_allowed_keys(err['loc'], schema)})")
        elif kind == "literal_error":
            lines.append(f"'{key}' = {shown} is not allowed; {err['msg'].replace('Input should be', 'allowed:')}")
        elif kind == "value_error":
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(msg if not err["loc"] or key in msg else f"{key}: {msg}")
        else:
            lines.append(f"'{key}' = {shown}: {err['msg']}")
    return f"{label}: invalid configuration: " + "; ".join(lines) + "."


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-branch tags ('str', 'BaseSpec') from an error location."""
    return tuple(p for p in loc if not (isinstance(p, str) and (p[:1].isupper() or p in ("str", "int", "float", "bool"))))


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


# ---------------------------------------------------------------------------------------------
# Canonical form: equal experiments get equal configs
# ---------------------------------------------------------------------------------------------
def canonical(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with every knob that cannot matter set to one fixed value.

    * momentum target: its weights are never optimised, so stop_grad=false is stop_grad=true;
    * shared target: there is no EMA, so momentum is dropped and the online encoder is fine-tuned;
    * no pre-training: every pre-training knob is irrelevant and reset to the defaults;
    * masking disabled: mask type/ratio are irrelevant.
    """
    d = cfg.to_dict()
    obj, default = d["objective"], ObjectiveConfig().model_dump(mode="json")
    if obj["target_encoder"] == "momentum":
        obj["stop_grad"] = True
    else:
        obj["momentum"] = None
        d["finetune"]["encoder"] = "online"
    if not d["masking"]["enabled"]:
        d["masking"] = {**MaskingConfig().model_dump(mode="json"), "enabled": False}
    if not d["pretrain"]["enabled"]:
        d["objective"] = default
        d["masking"] = MaskingConfig().model_dump(mode="json")
        d["augment"] = AugmentConfig().model_dump(mode="json")
        keep = {k: d["pretrain"][k] for k in ("enabled",)}
        d["pretrain"] = {**PretrainConfig().model_dump(mode="json"), **keep}
        d["finetune"]["encoder"] = "online"
    d["debug"] = DebugConfig().model_dump(mode="json") | {k: d["debug"][k] for k in ("crash_at_step", "nan_at_step")}
    return ExperimentConfig.model_validate(d)


def canonical_hash(cfg: ExperimentConfig) -> str:
    """Stable id of the experiment a config describes (resources do not change the experiment)."""
    d = canonical(cfg).to_dict()
    d.pop("resources")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
