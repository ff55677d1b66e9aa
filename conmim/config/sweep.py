"""The sweep file's schema: a base experiment, variants and/or a grid, seeds, search, the trials'
resources, tracking, the report. Only what Ray Tune, MLflow and the report need lives here; every
knob of a trial is an experiment key (:mod:`conmim.config.experiment`). Expansion into trials:
:mod:`conmim.config.expand`."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, Field, create_model, field_validator, model_validator

from conmim.config.errors import Strict
from conmim.config.experiment import ResourcesConfig
from conmim.metrics import FINAL_METRICS, VALIDATION_METRICS


def default_tracking_uri() -> str:
    """MLflow's store when the sweep file names none: ``mlflow.db`` in the working directory."""
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def _on_validation_split(v: str) -> str:
    if v not in VALIDATION_METRICS:
        what = "is measured on the test split" if v in FINAL_METRICS else "is not a known validation-split metric"
        raise ValueError(f"{v!r} {what}, and a search may select only on validation data; "
                         f"allowed: {', '.join(VALIDATION_METRICS)}")
    return v


# A metric a search (Optuna, ASHA) may select on: the error names the key it was given for.
ValidationMetric = Annotated[str, AfterValidator(_on_validation_split)]


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
    metric: ValidationMetric = Field("finetune_val_top1", description=f"one of {', '.join(VALIDATION_METRICS)}")
    mode: Literal["max", "min"] = "max"
    space: dict[str, Distribution] = Field(default_factory=dict)


class AshaSpec(Strict):
    metric: ValidationMetric = Field("knn_proxy_top1", description="a validation metric reported every pre-training epoch")
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2, gt=1)


class SelectionSpec(Strict):
    """A fair ablation: every arm (the baseline and each variant) gets the same budget of settings,
    and each arm's own setting is chosen on a validation metric, on seeds the comparison does not
    use; the comparison's seeds then run at each arm's choice. A diverged setting is never chosen
    while the arm has a stable one."""
    budget: dict[str, list] = Field(description="experiment keys and the values every arm is tried at "
                                    "(all combinations), e.g. {pretrain.lr: [3e-4, 1e-3]}")
    seeds: list[int] = Field(min_length=1, description="selection seeds: none of them may be a comparison seed")
    metric: ValidationMetric = Field("finetune_val_top1", description=f"one of {', '.join(VALIDATION_METRICS)}")
    mode: Literal["max", "min"] = "max"

    @field_validator("budget")
    @classmethod
    def _budget_lists(cls, v):
        if not v:
            raise ValueError("selection.budget is empty; give at least one key with its values")
        for k, vals in v.items():
            if not isinstance(vals, list) or not vals:
                raise ValueError(f"selection.budget.{k} must be a non-empty list of values")
        return v


class ReportSpec(Strict):
    metric: str = Field("finetune_top1", description="the primary metric of `conmim report` (a column of results.parquet)")
    baseline: str = Field("baseline", description="the variant every Δ is taken against, paired by seed")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v):
        if v not in FINAL_METRICS:
            raise ValueError(f"report.metric = {v!r} is not a metric of results.parquet; allowed: {', '.join(FINAL_METRICS)}")
        return v


def _optional(field):
    """A field of the experiment's schema as the sweep takes it: same type, limits and meaning,
    default None (= the base config's value)."""
    f = copy.copy(field)
    f.default = None
    return Optional[field.annotation], f


# The experiment's `resources` section, every key optional, plus Tune's one knob: one schema, not
# a copy. A key set here applies to every trial; a variant, grid or base.set may not also set it.
SweepResources = create_model(
    "SweepResources", __base__=Strict, __doc__="The trials' resources (the experiment's `resources` keys) and "
    "how many trials run at once.",
    max_concurrent_trials=(int, Field(1, ge=1, description="Tune: trials at once")),
    **{name: _optional(f) for name, f in ResourcesConfig.model_fields.items()})


class MlflowSpec(Strict):
    tracking_uri: Optional[str] = Field(None, description="default: default_tracking_uri(), mlflow.db in the working directory")
    experiment: Optional[str] = Field(None, description="default: the sweep name")


class SweepConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: Union[str, BaseSpec]
    variants: list[Variant] = Field(default_factory=list)
    only: Optional[list[str]] = Field(None, description="run only these variants (the baseline always runs): a "
                                      "subset of a study without editing its file, e.g. --set only=[scratch]")
    grid: dict[str, list] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    search: Literal["grid", "optuna"] = "grid"
    optuna: Optional[OptunaSpec] = None
    scheduler: Literal["none", "asha"] = "none"
    asha: AshaSpec = AshaSpec()
    resources: SweepResources = SweepResources()
    mlflow: MlflowSpec = MlflowSpec()
    report: ReportSpec = ReportSpec()
    selection: Optional[SelectionSpec] = Field(None, description="a selection stage before the comparison: each "
                                               "arm at its own best setting of a shared budget")
    storage: str = "./ray_results"
    max_failures: int = Field(0, ge=0, description="Tune: retries of a crashed trial, each resuming from the trial's "
                              "checkpoints (a trial's own worker restarts are resources.max_failures)")
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
        unknown = [n for n in self.only or [] if n not in names + ["baseline"]]
        if unknown:
            raise ValueError(f"only: {', '.join(map(repr, unknown))} is not a variant of this sweep; allowed: "
                             f"{', '.join(['baseline'] + names)}")
        if self.search == "optuna":
            if self.optuna is None or not self.optuna.space:
                raise ValueError("search=optuna needs an 'optuna' section with a non-empty 'space'")
            if self.grid:
                raise ValueError("grid cannot be combined with search=optuna (Optuna samples the space instead)")
        if self.selection is not None:
            sel = self.selection
            if self.search != "grid" or self.grid:
                raise ValueError("selection chooses each arm's setting before a comparison of arms: use it with "
                                 "variants and search=grid, without a 'grid' (the budget is the grid of settings)")
            shared = sorted(set(sel.seeds) & set(self.seeds))
            if shared:
                raise ValueError(f"selection.seeds and seeds share {shared}: choosing a setting on the seeds it is "
                                 f"compared on would favour it; give selection seeds of their own")
            twice = set(sel.budget) & ({k for v in self.variants for k in v.set} | set(self.base_spec.set)
                                       | set(self.resource_overrides()))
            if twice:
                raise ValueError(f"{', '.join(sorted(twice))} is in selection.budget and also set by base.set, the "
                                 f"resources section or a variant; a budget key is chosen per arm, so set it only "
                                 f"in the budget")
        if self.scheduler == "asha" and self.search != "optuna":
            raise ValueError("scheduler=asha stops trials early: use it with search=optuna, not with an ablation grid")
        both = set(self.resource_overrides()) & ({k for v in self.variants for k in v.set} | set(self.grid)
                                                   | set(self.base_spec.set))
        if both:
            raise ValueError(f"{', '.join(sorted(both))} set both in the sweep's resources section and in base.set, "
                             f"a variant or the grid; set each key in one place")
        return self

    @property
    def base_spec(self) -> BaseSpec:
        return BaseSpec(config=self.base) if isinstance(self.base, str) else self.base

    def resource_overrides(self) -> dict[str, Any]:
        """The experiment keys the sweep's `resources` section sets for every trial."""
        r = self.resources
        return {f"resources.{k}": getattr(r, k) for k in ResourcesConfig.model_fields if getattr(r, k) is not None}

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or default_tracking_uri()

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or self.name
