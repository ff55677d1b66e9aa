"""The sweep file: a base experiment, variants and/or a grid, seeds, search, resources, tracking.

Expansion turns it into trials; trials that are the same experiment (``canonical()``) run once,
the others become aliases of the first."""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from conmim.config import (ConfigError, ExperimentConfig, build, canonical_hash, format_validation_error,
                           load_source, parse_override, read_yaml, set_dotted)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Metrics measured on the validation split, the only ones a search (optuna.metric, asha.metric)
# may select on; every other metric (finetune_top1, linear_probe_top1, knn_top1, ...) is measured
# on the test split. Add a new validation metric here.
VALIDATION_METRICS = ("finetune_val_top1", "knn_proxy_top1")


def _validation_metric(key: str, v: str) -> str:
    if v not in VALIDATION_METRICS:
        what = "is measured on the test split" if v in report_metrics() else "is not a known validation-split metric"
        raise ValueError(f"{key} = {v!r} {what}, and a search may select only on validation data; "
                         f"allowed: {', '.join(VALIDATION_METRICS)}")
    return v


def report_metrics() -> tuple[str, ...]:
    """The metric columns of results.parquet a report can be made of (``report.metric``)."""
    from conmim.sweep import FINAL_METRICS  # here, not at the top: conmim.sweep imports this module
    return tuple(FINAL_METRICS)


class BaseSpec(Strict):
    config: str = Field(description="a preset name or an experiment YAML file")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted overrides applied to every trial")


class Variant(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    set: dict[str, Any] = Field(default_factory=dict)
    note: str = Field("", description="what the variant tests (shown in the report)")


class Distribution(Strict):
    type: Literal["loguniform", "uniform", "int", "choice"]
    low: Optional[float] = None
    high: Optional[float] = None
    values: Optional[list] = None

    @model_validator(mode="after")
    def _shape(self):
        if self.type == "choice":
            if not self.values:
                raise ValueError("a choice distribution needs a non-empty 'values' list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} distribution needs low < high (got low={self.low}, high={self.high})")
        elif self.type == "loguniform" and self.low <= 0:
            raise ValueError("a loguniform distribution needs low > 0")
        return self


class OptunaSpec(Strict):
    num_samples: int = Field(8, ge=1)
    metric: str = Field("finetune_val_top1", description=f"a validation-split metric: {', '.join(VALIDATION_METRICS)}")
    mode: Literal["max", "min"] = "max"
    space: dict[str, Distribution] = Field(default_factory=dict)

    @field_validator("metric")
    @classmethod
    def _on_validation(cls, v):
        return _validation_metric("optuna.metric", v)


class AshaSpec(Strict):
    metric: str = Field("knn_proxy_top1", description="a metric reported every pre-training epoch")
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2, gt=1)

    @field_validator("metric")
    @classmethod
    def _on_validation(cls, v):
        return _validation_metric("asha.metric", v)


class ReportSpec(Strict):
    metric: str = Field("finetune_top1", description="the primary metric of `conmim report` (a column of results.parquet)")
    baseline: str = Field("baseline", description="the variant every Δ is taken against, paired by seed")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v):
        allowed = report_metrics()
        if v not in allowed:
            raise ValueError(f"report.metric = {v!r} is not a metric of results.parquet; allowed: {', '.join(allowed)}")
        return v


class SweepResources(Strict):
    num_workers: Optional[int] = Field(None, ge=1, description="Ray Train workers per trial (default: the base config's)")
    use_gpu: Optional[bool] = None
    cpus_per_worker: Optional[float] = Field(None, gt=0)
    gpus_per_worker: Optional[float] = Field(None, ge=0)
    max_concurrent_trials: int = Field(1, ge=1)


class MlflowSpec(Strict):
    tracking_uri: Optional[str] = Field(None, description="default: sqlite file mlflow.db in the working directory")
    experiment: Optional[str] = Field(None, description="default: the sweep name")


class SweepConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: Union[str, BaseSpec]
    variants: list[Variant] = Field(default_factory=list)
    grid: dict[str, list] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    search: Literal["grid", "optuna"] = "grid"
    optuna: Optional[OptunaSpec] = None
    scheduler: Literal["none", "asha"] = "none"
    asha: AshaSpec = AshaSpec()
    resources: SweepResources = SweepResources()
    mlflow: MlflowSpec = MlflowSpec()
    report: ReportSpec = ReportSpec()
    storage: str = "./ray_results"
    max_failures: int = Field(0, ge=0, description="Tune retries of a crashed trial")
    min_free_gb: float = Field(1.0, ge=0, description="refuse to start when the storage filesystem has less free space")

    @field_validator("name")
    @classmethod
    def _name_stays_inside_storage(cls, v):
        if v in (".", "..") or ".." in v:
            raise ValueError(f"'name' = {v!r} may not be '.' or '..' or contain '..': it names the sweep's "
                             f"folder inside 'storage' and may not point outside it")
        return v

    @field_validator("grid")
    @classmethod
    def _grid_lists(cls, v):
        for k, vals in v.items():
            if not vals:
                raise ValueError(f"grid.{k} is an empty list; give at least one value")
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"seeds has duplicates: {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        names = [v.name for v in self.variants]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"variants: duplicate variant name(s) {sorted(dup)}; names must be unique")
        if "baseline" in names:
            raise ValueError("variants: 'baseline' is implicit (the base config); give this variant another name")
        if self.search == "optuna":
            if self.optuna is None or not self.optuna.space:
                raise ValueError("search=optuna needs an 'optuna' section with a non-empty 'space'")
            if self.grid:
                raise ValueError("grid cannot be combined with search=optuna (Optuna samples the space instead)")
        if self.scheduler == "asha" and self.search != "optuna":
            raise ValueError("scheduler=asha stops trials early: use it with search=optuna, not with an ablation grid")
        return self

    @property
    def base_spec(self) -> BaseSpec:
        return BaseSpec(config=self.base) if isinstance(self.base, str) else self.base


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
    extra: dict = field(default_factory=dict)


@dataclass
class Sweep:
    spec: SweepConfig
    path: Path
    base_raw: dict
    trials: list[Trial]

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
        return self.spec.mlflow.tracking_uri or f"sqlite:///{Path('mlflow.db').resolve()}"

    @property
    def experiment(self) -> str:
        return self.spec.mlflow.experiment or self.spec.name

    def trial_config(self, overrides: dict[str, Any], seed: int) -> ExperimentConfig:
        return _trial_config(self.base_raw, self.spec, overrides, seed, f"{self.path}")


def _resource_overrides(spec: SweepConfig) -> dict[str, Any]:
    r = spec.resources
    return {f"resources.{k}": getattr(r, k) for k in ("num_workers", "use_gpu", "cpus_per_worker", "gpus_per_worker")
            if getattr(r, k) is not None}


def _trial_config(base_raw, spec: SweepConfig, overrides: dict, seed: int, label: str) -> ExperimentConfig:
    merged = {**spec.base_spec.set, **_resource_overrides(spec), **overrides, "seed": seed}
    return build(base_raw, merged, label=label)


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


def load_sweep(path: str, sets: list[str] | None = None) -> Sweep:
    """Parse, validate and expand a sweep file; every problem is a ConfigError (exit 2)."""
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
    sweep = Sweep(spec, Path(path), base_raw, [])
    grid_keys = list(spec.grid)
    combos = list(itertools.product(*(spec.grid[k] for k in grid_keys))) or [()]
    variants = [Variant(name="baseline", note="the base configuration")] + spec.variants
    seen: dict[str, str] = {}
    for v in variants:
        for combo in combos:
            gvals = dict(zip(grid_keys, combo))
            label = v.name + "".join(f"_{k.split('.')[-1]}={_value_name(x)}" for k, x in gvals.items())
            for seed in spec.seeds:
                overrides = {**v.set, **gvals}
                cfg = _trial_config(base_raw, spec, overrides, seed, f"{path}: variant '{v.name}'")
                key = canonical_hash(cfg)
                name = f"{label}_seed{seed}"
                sweep.trials.append(Trial(name, label, seed, overrides, cfg, key, seen.get(key), v.note))
                seen.setdefault(key, name)
    labels = list(dict.fromkeys(t.variant for t in sweep.trials))
    if "baseline" in spec.report.model_fields_set and spec.search != "optuna" and spec.report.baseline not in labels:
        raise ConfigError(f"{path} (sweep): invalid configuration: report.baseline = {spec.report.baseline!r} is not a "
                          f"variant of this sweep; allowed: {', '.join(labels)}.")
    if spec.search == "optuna":
        # the sampled trials are created by Optuna at run time; the expansion holds the base only
        sweep.trials = [t for t in sweep.trials if t.variant == "baseline"][:1]
    return sweep


def trial_table(sweep: Sweep) -> str:
    rows = [("trial", "variant", "seed", "overrides", "alias_of")]
    for t in sweep.trials:
        ov = ", ".join(f"{k}={v}" for k, v in t.overrides.items()) or "-"
        rows.append((t.name, t.variant, str(t.seed), ov, t.alias_of or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
