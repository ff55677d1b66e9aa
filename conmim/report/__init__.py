"""``conmim report``: the sweep as a paper-style ablation table, with a forest plot.

Every variant is compared with the reference variant (``report.baseline`` of the sweep file,
default ``baseline``) on the primary metric (``report.metric``, default ``finetune_top1``), seed by
seed: trials with the same seed share initialisation and data order, so the differences are paired
(``conmim.stats``)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from conmim.config.errors import ConfigError
from conmim.config.sweep import default_tracking_uri
from conmim.metrics import FINAL_METRICS
from conmim.report.plot import forest_plot
from conmim.report.rows import report_spec_from_mlflow, report_spec_of_sweep, rows_from_mlflow, rows_from_parquet, validated_spec
from conmim.report.selection import read_choice, selection_markdown
from conmim.report.table import markdown, summarize


def make_report(source: str | Path, tracking_uri: Optional[str] = None, out_dir: Optional[Path] = None,
                metric: Optional[str] = None) -> dict:
    """Report of a sweep folder (results.parquet) or of an MLflow experiment by name. ``metric``:
    another column as the table's primary metric, for a secondary read-out (e.g. the k-NN of the
    study); it goes to report_METRIC.md/.png beside the primary report, which stays as it is."""
    src = Path(source)
    if (src / "results.parquet").exists():
        rows, title = rows_from_parquet(src), src.name
        state = json.loads((src / "sweep.json").read_text()) if (src / "sweep.json").exists() else {}
        spec = validated_spec(report_spec_of_sweep(state), f"{state.get('sweep_file') or src / 'sweep.json'} (sweep)")
        out_dir = out_dir or src
    else:
        uri = tracking_uri or default_tracking_uri()
        rows, title, state = rows_from_mlflow(str(source), uri), str(source), {}
        spec = validated_spec(report_spec_from_mlflow(str(source), uri), f"MLflow experiment '{source}' (sweep tags)")
        out_dir = out_dir or Path(".")
    secondary = metric is not None and metric != spec.metric
    if secondary:
        spec = validated_spec({"metric": metric, "baseline": spec.baseline}, "--metric")
    if rows and spec.metric not in rows[0]:
        raise ConfigError(f"report.metric = {spec.metric!r} is not a column of the sweep's results; columns: "
                          f"{', '.join(k for k in rows[0] if k in FINAL_METRICS)}.")
    summary = summarize(rows, spec.metric, spec.baseline)
    md = markdown(summary, f"Ablation: {title}")
    if not secondary and (choice := read_choice(src)) is not None:
        md += "\n" + selection_markdown(choice)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"report_{spec.metric}" if secondary else "report"
    (out_dir / f"{stem}.md").write_text(md)
    ref = summary[0]["reference"] if summary else spec.baseline
    png = forest_plot(summary, out_dir / f"{stem}.png", f"{title}: Δ {spec.metric} vs {ref}")
    if state.get("parent_run_id"):
        from conmim.tracking import client as mlflow_runs
        c = mlflow_runs.client(state["tracking_uri"])
        mlflow_runs.retry(c.log_artifact, state["parent_run_id"], str(out_dir / f"{stem}.md"))
        mlflow_runs.retry(c.log_artifact, state["parent_run_id"], str(png))
        if not secondary:
            publish_on_parent(state["tracking_uri"], state["parent_run_id"], md, png.name, summary, rows)
    return {"markdown": md, "summary": summary, "png": png, "report": out_dir / f"{stem}.md"}


def delta_metric_name(metric: str, variant: str) -> str:
    """The parent run's metric holding ``variant``'s Δ (MLflow allows letters, digits and ``_-. :/``
    in names; a grid label's ``=`` or ``+`` becomes ``_``)."""
    return f"delta_{metric}/" + re.sub(r"[^\w.\- :]", "_", variant)


def publish_on_parent(uri: str, parent_id: str, md: str, png_name: str, summary: list[dict],
                      rows: list[dict] | None = None) -> None:
    """The answer on the sweep's page in the MLflow UI: the ablation table first, cut to its answer
    (MLflow folds a description after 150 px behind "Show more"), then the report's flags (⚠), each trial with its
    ``finetune_top1`` (a child run is otherwise folded under the parent in the runs table), the
    forest plot (an artifact of the run, shown inline), the whole table and the report's explanation last; each
    variant's Δ vs the reference is a metric of the parent, in the metric's own unit (a fraction,
    like ``finetune_top1``). A resumed sweep that finishes replaces the description and gives the
    metrics new values."""
    from conmim.tracking import client as mlflow_runs
    from conmim.tracking import tags as T
    from conmim.report.table import metric_scale
    lines = md.splitlines()
    title = lines[0]
    table = [l for l in lines if l.startswith("|")]
    flags = [l for l in lines if l.startswith("**⚠")]  # after the table: before it, they pushed it under the fold
    prose = [l for l in lines[1:] if l and l not in table and l not in flags]
    trials = ["| trial | status | finetune_top1 |", "|---|---|---|"] + [
        f"| {r['trial']} | {r['status']} | {_top1(r.get('finetune_top1'))} |" for r in rows or []]
    plot = f"get-artifact?path={png_name}&run_uuid={parent_id}"  # relative: the UI's own server serves it
    note = "\n".join([f"**{title.lstrip('# ')}**", "", *compact_table(table), "", *sum(([f, ""] for f in flags), []),
                      "Trials:", "", *trials, "", f"![forest plot: Δ vs the reference, 95 % CI]({plot})", "",
                      "The whole table:", "", *table, "", *prose]) + "\n"
    c = mlflow_runs.client(uri)
    mlflow_runs.retry(c.set_tag, parent_id, T.NOTE_CONTENT, note[:7990])  # MLflow's limit for a tag: 8000
    deltas = {delta_metric_name(s["metric"], s["variant"]): s["delta"] / metric_scale(s["metric"])[0]
              for s in summary if not s["is_reference"]}
    mlflow_runs.log_metrics(uri, parent_id, deltas)


COMPACT_COLUMNS = 4  # variant, the metric, Δ [95 % CI], p: one line a row


def compact_table(table: list[str]) -> list[str]:
    """The report's table cut to the columns that answer the question (variant, the metric, Δ and
    its CI, p), one short line a row: MLflow shows only the first 150 px of a description unfolded."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table]
    return ["| " + " | ".join(r[:1] + r[2:2 + COMPACT_COLUMNS - 1]) + " |" for r in rows]


def _top1(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) and v == v else "–"
