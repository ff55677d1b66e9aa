"""The rows a report is made of: ``results.parquet`` of a sweep folder, or the runs of an MLflow
experiment (tags and metrics written by the sweep), and the sweep's ``report`` section."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conmim.metrics import FINAL_METRICS
from conmim.tracking import client as mlflow_runs
from conmim.tracking import tags as T


def rows_from_parquet(sweep_dir: Path) -> list[dict]:
    import pyarrow.parquet as pq
    return pq.read_table(sweep_dir / "results.parquet").to_pylist()


def rows_from_mlflow(experiment: str, tracking_uri: str) -> list[dict]:
    c = mlflow_runs.client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise FileNotFoundError(f"no sweep folder and no MLflow experiment named '{experiment}' at {tracking_uri}")
    rows = []
    for run in mlflow_runs.find_runs(tracking_uri, exp.experiment_id, f"tags.`{T.ROLE}` = 'trial'"):
        t, m = run.data.tags, run.data.metrics
        status = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "killed"}.get(run.info.status, run.info.status.lower())
        base = {"trial": t.get(T.TRIAL), "variant": t.get(T.VARIANT), "seed": int(t.get(T.SEED, 0)),
                "note": t.get(T.NOTE, ""), "overrides": t.get(T.OVERRIDES, ""), "alias_of": "", "status": status,
                "reason": t.get(T.REASON, ""),
                "collapsed": bool(m.get("collapsed", 0)), "at_chance": bool(m.get("at_chance", 0)),
                **{k: m.get(k, float("nan")) for k in FINAL_METRICS}}
        for flag in ("positional_shortcut", "diverged"):  # (flags added later: absent from older runs)
            if flag in m:
                base[flag] = bool(m[flag])
        if t.get(T.PROBE_ENCODER):
            base["probe_encoder"] = t[T.PROBE_ENCODER]
        rows.append(base)
        for a in json.loads(t.get(T.ALIAS_RECORDS, "[]")):
            rows.append({**base, "trial": a["name"], "variant": a["variant"], "seed": a["seed"], "note": a["note"],
                         "overrides": json.dumps(a["overrides"], sort_keys=True), "alias_of": base["trial"],
                         "status": f"alias ({status})"})
    return rows


def report_spec_from_mlflow(experiment: str, tracking_uri: str) -> dict:
    """``{"metric", "baseline"}`` from the tags of the sweep's parent run, where it has them."""
    exp = mlflow_runs.client(tracking_uri).get_experiment_by_name(experiment)
    if exp is None:
        return {}
    parents = mlflow_runs.find_runs(tracking_uri, exp.experiment_id, f"tags.`{T.ROLE}` = 'sweep'")
    tags = parents[0].data.tags if parents else {}
    return {k: tags[tag] for k, tag in (("metric", T.REPORT_METRIC), ("baseline", T.REPORT_BASELINE)) if tags.get(tag)}


def report_spec_of_sweep(state: dict) -> dict:
    """The ``report`` section of the sweep a folder came from: ``sweep.json``'s own copy if it has
    one, else the sweep file's (when it is still there); {} otherwise (defaults)."""
    if isinstance(state.get("report"), dict):
        return state["report"]
    f = state.get("sweep_file")
    if f and Path(f).is_file():
        from conmim.config.loading import read_yaml
        raw = read_yaml(f)
        return raw.get("report") or {} if isinstance(raw, dict) else {}
    return {}


def validated_spec(raw: Any, label: str):
    """``raw`` (a sweep file's ``report`` section) as a validated ReportSpec; a bad key or value is a
    ConfigError naming it (``report.metric`` ...) and what is allowed."""
    from pydantic import ValidationError
    from conmim.config.errors import ConfigError, Strict
    from conmim.config.loading import format_validation_error
    from conmim.config.sweep import ReportSpec, SweepConfig

    class ReportSection(Strict):
        report: ReportSpec = ReportSpec()
    try:
        return ReportSection.model_validate({"report": raw or {}}).report
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, label, SweepConfig)) from None
