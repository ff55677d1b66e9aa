"""``conmim report``: the sweep as a paper-style ablation table, with a forest plot.

Every variant is compared with the reference variant (``report.baseline`` of the sweep file,
default ``baseline``) on the primary metric (``report.metric``, default ``finetune_top1``), seed by
seed: trials with the same seed share initialisation and data order, so the differences are paired
(``conmim.stats``)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from conmim import stats

DEFAULT_METRIC = "finetune_top1"
DEFAULT_BASELINE = "baseline"
# tags of the sweep's parent MLflow run that name the primary metric and the reference variant
REPORT_METRIC_TAG = "conmim.report.metric"
REPORT_BASELINE_TAG = "conmim.report.baseline"
PROBE_ENCODER_TAG = "conmim.probe_encoder"


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
def rows_from_parquet(sweep_dir: Path) -> list[dict]:
    import pyarrow.parquet as pq
    return pq.read_table(sweep_dir / "results.parquet").to_pylist()


def _metric_names() -> tuple[str, ...]:
    from conmim.sweep_config import report_metrics
    return report_metrics()


def rows_from_mlflow(experiment: str, tracking_uri: str) -> list[dict]:
    from conmim import tracking
    c = tracking.client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise FileNotFoundError(f"no sweep folder and no MLflow experiment named '{experiment}' at {tracking_uri}")
    rows = []
    for run in tracking.find_runs(tracking_uri, exp.experiment_id, f"tags.`{tracking.ROLE_TAG}` = 'trial'"):
        t, m = run.data.tags, run.data.metrics
        status = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "killed"}.get(run.info.status, run.info.status.lower())
        base = {"trial": t.get(tracking.TRIAL_TAG), "variant": t.get("conmim.variant"), "seed": int(t.get("conmim.seed", 0)),
                "note": t.get("conmim.note", ""), "overrides": t.get("conmim.overrides", ""), "alias_of": "", "status": status, "reason": t.get(tracking.REASON_TAG, ""),
                "collapsed": bool(m.get("collapsed", 0)), "at_chance": bool(m.get("at_chance", 0)),
                **{k: m.get(k, float("nan")) for k in _metric_names()}}
        if "positional_shortcut" in m:
            base["positional_shortcut"] = bool(m["positional_shortcut"])
        if t.get(PROBE_ENCODER_TAG):
            base["probe_encoder"] = t[PROBE_ENCODER_TAG]
        rows.append(base)
        for a in json.loads(t.get("conmim.alias_records", "[]")):
            rows.append({**base, "trial": a["name"], "variant": a["variant"], "seed": a["seed"], "note": a["note"],
                         "overrides": json.dumps(a["overrides"], sort_keys=True), "alias_of": base["trial"],
                         "status": f"alias ({status})"})
    return rows


def report_spec_from_mlflow(experiment: str, tracking_uri: str) -> dict:
    """``{"metric", "baseline"}`` from the tags of the sweep's parent run, where it has them."""
    from conmim import tracking
    exp = tracking.client(tracking_uri).get_experiment_by_name(experiment)
    if exp is None:
        return {}
    parents = tracking.find_runs(tracking_uri, exp.experiment_id, f"tags.`{tracking.ROLE_TAG}` = 'sweep'")
    tags = parents[0].data.tags if parents else {}
    return {k: tags[tag] for k, tag in (("metric", REPORT_METRIC_TAG), ("baseline", REPORT_BASELINE_TAG)) if tags.get(tag)}


def report_spec_of_sweep(state: dict) -> dict:
    """The ``report`` section of the sweep a folder came from: ``sweep.json``'s own copy if it has
    one, else the sweep file's (when it is still there); {} otherwise (defaults)."""
    if isinstance(state.get("report"), dict):
        return state["report"]
    f = state.get("sweep_file")
    if f and Path(f).is_file():
        from conmim.config import read_yaml
        raw = read_yaml(f)
        return raw.get("report") or {} if isinstance(raw, dict) else {}
    return {}


def validated_spec(raw: Any, label: str):
    """``raw`` (a sweep file's ``report`` section) as a validated ReportSpec; a bad key or value is a
    ConfigError naming it (``report.metric`` ...) and what is allowed."""
    from pydantic import ValidationError
    from conmim.config import ConfigError, format_validation_error
    from conmim.sweep_config import ReportSpec, Strict, SweepConfig

    class ReportSection(Strict):
        report: ReportSpec = ReportSpec()
    try:
        return ReportSection.model_validate({"report": raw or {}}).report
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, label, SweepConfig)) from None


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def _flag(v: Any) -> bool:
    """A boolean column that may be missing, None, NaN, a bool or a 0/1 float."""
    if v is None or isinstance(v, str):
        return False
    if isinstance(v, float) and not math.isfinite(v):
        return False
    return bool(v)


def _overrides(row: dict) -> dict:
    ov = row.get("overrides") or {}
    if isinstance(ov, str):
        try:
            ov = json.loads(ov)
        except json.JSONDecodeError:
            return {}
    return ov if isinstance(ov, dict) else {}


def probe_encoder(row: dict) -> str:
    """Which encoder the row's probes (and fine-tune) used: the row's ``probe_encoder`` column if it
    has one; else from its config (a ``config`` dict, else its overrides): no pre-training ⇒
    ``random init``, ``objective.target_encoder: shared`` ⇒ ``online`` (there is no other encoder),
    else ``finetune.encoder``; default ``momentum``."""
    v = row.get("probe_encoder")
    if isinstance(v, str) and v:
        return v
    cfg = row.get("config") if isinstance(row.get("config"), dict) else None
    if cfg:
        get = lambda sec, k, d: (cfg.get(sec) or {}).get(k, d)  # noqa: E731
    else:
        ov = _overrides(row)
        get = lambda sec, k, d: ov.get(f"{sec}.{k}", d)  # noqa: E731
    if get("pretrain", "enabled", True) is False:
        return "random init"
    if get("objective", "target_encoder", "momentum") == "shared":
        return "online"
    return str(get("finetune", "encoder", "momentum"))


def metric_scale(metric: str) -> tuple[float, str]:
    """Accuracies (``*_top1``, fractions) are shown in percent and their differences in points."""
    return (100.0, "points") if metric.endswith("_top1") else (1.0, "")


# ---------------------------------------------------------------------------------------------
# The table's numbers
# ---------------------------------------------------------------------------------------------
def _finished(r: dict) -> bool:
    return str(r["status"]).startswith(("finished", "alias (finished"))


def summarize(rows: list[dict], metric: str = DEFAULT_METRIC, baseline: str = DEFAULT_BASELINE) -> list[dict]:
    """Per variant, in first-seen order: mean/std/CI of the primary metric over seeds; Δ vs the
    reference variant paired by seed (mean, sd, 95 % CI, paired-t p, Holm-adjusted p, MDE at 80 %
    power); the probes, the encoder they used, target spread and the warnings.

    The reference is ``baseline`` when a variant has that name, else the first variant."""
    scale, _ = metric_scale(metric)
    order: list[str] = []
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["variant"] not in groups:
            order.append(r["variant"])
        groups.setdefault(r["variant"], []).append(r)
    pct = lambda rs, k: stats.mean_sd_ci([100 * _num(r.get(k)) for r in rs])[0]  # noqa: E731
    out = []
    for v in order:
        rs = [r for r in groups[v] if _finished(r)]
        vals = [(int(r["seed"]), scale * _num(r.get(metric))) for r in rs]
        seeds = [s for s, _ in vals]
        m, sd, ci = stats.mean_sd_ci([x for _, x in vals])
        out.append({
            "variant": v, "n": len(rs), "planned": len(groups[v]), "mean": m, "std": sd, "ci95": ci,
            "metric": metric, "by_seed": dict(vals) if len(set(seeds)) == len(seeds) else None,
            "finetune": pct(rs, "finetune_top1"),
            "linear_probe": pct(rs, "linear_probe_top1"),
            "knn": pct(rs, "knn_top1"),
            "target_std": stats.mean_sd_ci([_num(r.get("final_target_std")) for r in rs])[0],
            "probe_encoder": ", ".join(dict.fromkeys(probe_encoder(r) for r in groups[v])),
            "collapsed": sum(_flag(r["collapsed"]) for r in rs), "at_chance": sum(_flag(r["at_chance"]) for r in rs),
            "shortcut": sum(_flag(r.get("positional_shortcut")) for r in rs),
            "failed": sum(str(r["status"]).startswith("failed") or "failed" in str(r["status"]) for r in groups[v]),
            "alias_of": sorted({r["alias_of"].rsplit("_seed", 1)[0] for r in groups[v] if r.get("alias_of")}),
            "changed": groups[v][0].get("note") or _overrides_text(groups[v][0].get("overrides", "")),
        })
    ref = next((s for s in out if s["variant"] == baseline), out[0] if out else None)
    for s in out:
        s["reference"] = ref["variant"] if ref else ""
        s["is_reference"] = s is ref
        nan = float("nan")
        if s is ref:
            test = stats.PairedTest(0, 0.0, nan, nan, nan, nan, nan, "reference")
        elif s["by_seed"] is None or ref["by_seed"] is None:
            test = stats.PairedTest(0, nan, nan, nan, nan, nan, nan, "several trials per seed: not paired")
        else:
            test = stats.paired_t(list(stats.paired_differences(s["by_seed"], ref["by_seed"]).values()))
        s.update(delta=test.mean, delta_sd=test.sd, delta_ci=(test.ci_low, test.ci_high), p=test.p,
                 n_pairs=test.n, paired_note=test.note, mde=stats.mde_paired(test.sd, test.n))
    for s, adj in zip(out, stats.holm([s["p"] for s in out])):
        s["p_holm"] = adj
        s["significant"] = bool(adj == adj and adj < stats.ALPHA)
    return out


def reading(s: dict, unit: str) -> str:
    """What a row's Δ says, in words; a CI that includes 0 is 'smaller than the MDE', never 'no effect'."""
    if s["is_reference"]:
        return "reference"
    if s["paired_note"]:
        return s["paired_note"]
    lo, hi = s["delta_ci"]
    u = f" {unit}" if unit else ""
    if lo <= 0 <= hi:
        if s["mde"] == s["mde"]:
            return f"smaller than {_fmt(s['mde'])}{u} (the MDE), if any"
        return "CI includes 0"
    if s["significant"]:
        return f"Δ {'>' if s['delta'] > 0 else '<'} 0 (Holm p < {stats.ALPHA:g})"
    return "CI excludes 0, not after Holm"


def _overrides_text(ov: str) -> str:
    try:
        d = json.loads(ov) if ov else {}
    except json.JSONDecodeError:
        return ov
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "-"


def _fmt(x: float, nd: int = 2, sign: bool = False) -> str:
    return "–" if x is None or x != x else (f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}")


def _fmt_p(p: float) -> str:
    if p != p:
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _collapse_warning(summary: list[dict]) -> list[str]:
    """Numbers that lie: a collapsed pre-training, a chance-level fine-tune or a pre-training task
    solved by position is said up front."""
    n = sum(s["n"] for s in summary)
    lines = []
    collapsed, chance = sum(s["collapsed"] for s in summary), sum(s["at_chance"] for s in summary)
    if collapsed or chance:
        who = ", ".join(s["variant"] for s in summary if s["collapsed"] or s["at_chance"])
        lines += [f"**⚠ {collapsed} of {n} finished trials collapsed** (target feature spread < 0.1) and {chance} "
                  f"fine-tuned to within 5 points of chance ({who}): their top-1 measures a failed pre-training, "
                  f"not the ablated component.", ""]
    shortcut = sum(s["shortcut"] for s in summary)
    if shortcut:
        who = ", ".join(s["variant"] for s in summary if s["shortcut"])
        lines += [f"**⚠ {shortcut} of {n} finished trials solved the pre-training task by position** ({who}): the "
                  f"masked query found its key by their shared position code, so the pre-training loss says nothing "
                  f"about the contrastive task and their numbers measure that shortcut, not the ablated component.", ""]
    return lines


def markdown(summary: list[dict], title: str) -> str:
    metric = summary[0]["metric"] if summary else DEFAULT_METRIC
    ref = summary[0]["reference"] if summary else DEFAULT_BASELINE
    scale, unit = metric_scale(metric)
    u = f" {unit}" if unit else ""
    tested = sum(s["p"] == s["p"] for s in summary)
    full = metric != "finetune_top1"
    lines = [f"# {title}", "",
             f"Primary metric `{metric}`{' (%)' if scale == 100 else ''} over seeds: mean ± std. "
             f"Δ vs `{ref}`, paired by seed (the same seed = the same initialisation and data order; only seeds "
             f"both finished): mean Δ{u} with its 95 % CI (Student t, n − 1 df), p of the two-sided paired t-test, "
             f"and p Holm-adjusted across the {tested or 'no'} rows with a p-value (`*`: Holm p < {stats.ALPHA:g}). "
             f"MDE: the true |Δ| the paired test (α = {stats.ALPHA:g} two-sided, not Holm-adjusted) detects with "
             f"{stats.POWER * 100:.0f} % power, from the noncentral t with the row's observed sd of Δ (itself uncertain "
             f"with few seeds); a row whose CI includes 0 reads \"smaller than MDE\": an effect that large would "
             f"probably have been seen, a smaller one may be there and missed. With one seed there is no CI or "
             f"p-value. {'Full-label FT: fine-tuned top-1 with every label. ' if full else ''}"
             f"Probes: linear probe and k-NN top-1 (%) on the frozen encoder named in *probe encoder*. "
             f"Target spread: std of the targets across patches at the end of pre-training, the collapse indicator "
             f"(< 0.1 = collapsed).", "",
             *_collapse_warning(summary),
             f"| variant | what changed | {metric} | Δ [95 % CI] | p | p Holm | MDE | n pairs | reading | "
             f"{'full-label FT | ' if full else ''}linear probe | k-NN | probe encoder | target spread | notes |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if full else "") + "---|---|---|---|---|"]
    for s in summary:
        notes = []
        if s["alias_of"]:
            notes.append(f"same experiment as {', '.join(s['alias_of'])}")
        if s["collapsed"]:
            notes.append(f"{s['collapsed']} collapsed")
        if s["at_chance"]:
            notes.append(f"{s['at_chance']} at chance")
        if s["shortcut"]:
            notes.append(f"{s['shortcut']} positional shortcut")
        if s["failed"]:
            notes.append(f"{s['failed']} failed")
        if s["n"] < s["planned"] and not s["failed"]:
            notes.append(f"{s['planned'] - s['n']} unfinished")
        flag = (" ⚠ COLLAPSED" if s["collapsed"] else "") + (" ⚠ AT CHANCE" if s["at_chance"] and not s["collapsed"] else "") \
            + (" ⚠ POSITIONAL SHORTCUT" if s["shortcut"] else "")
        if s["is_reference"]:
            delta = "reference"
        else:
            lo, hi = s["delta_ci"]
            ci = f" [{_fmt(lo, sign=True)}, {_fmt(hi, sign=True)}]" if lo == lo else ""
            delta = _fmt(s["delta"], sign=True) + ci + ("*" if s["significant"] else "")
        nd = 2 if scale == 100 else 4
        lines.append(f"| {s['variant']} | {s['changed']} | {_fmt(s['mean'], nd)} ± {_fmt(s['std'], nd)}{flag} | {delta} | "
                     f"{_fmt_p(s['p'])} | {_fmt_p(s['p_holm'])} | {_fmt(s['mde'], nd)} | "
                     f"{'–' if s['is_reference'] else s['n_pairs']} | {reading(s, unit)} | "
                     f"{_fmt(s['finetune']) + ' | ' if full else ''}{_fmt(s['linear_probe'])} | {_fmt(s['knn'])} | "
                     f"{s['probe_encoder']} | {_fmt(s['target_std'], 3)} | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The plot
# ---------------------------------------------------------------------------------------------
def forest_plot(summary: list[dict], path: Path, title: str) -> Path:
    """``forest_figure`` written to ``path`` (PNG)."""
    import matplotlib.pyplot as plt
    fig = forest_figure(summary, title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def forest_figure(summary: list[dict], title: str):
    """Δ vs the reference per variant (first variant on top) with its 95 % CI as a horizontal error
    bar, a zero line, the ±MDE band, Holm-significant rows filled and starred; a row without a CI
    says why ("n = 1: no CI") instead of drawing zero-width whiskers. A matplotlib Figure (Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    metric = summary[0]["metric"] if summary else DEFAULT_METRIC
    ref = summary[0]["reference"] if summary else DEFAULT_BASELINE
    _, unit = metric_scale(metric)
    rows = [s for s in summary if not s["is_reference"]]
    fig, ax = plt.subplots(figsize=(8, 0.42 * max(len(rows), 1) + 2.4), layout="constrained")
    xs = [0.0]
    for i, s in enumerate(rows):
        y = len(rows) - 1 - i
        bad = s["collapsed"] or s["at_chance"] or s["shortcut"]
        color = "#c0392b" if bad else "#1f4e79"
        d, (lo, hi), mde = s["delta"], s["delta_ci"], s["mde"]
        if mde == mde:
            ax.barh(y, 2 * mde, left=-mde, height=0.6, color="#d5d8dc", zorder=0, linewidth=0)
            xs += [-mde, mde]
        if d != d:
            ax.annotate(s["paired_note"] or "no Δ", (0, y), xytext=(6, 0), textcoords="offset points", va="center",
                        fontsize=8, color="#555555")
            continue
        xs.append(d)
        if lo == lo:
            ax.errorbar(d, y, xerr=[[d - lo], [hi - d]], fmt="none", ecolor=color, capsize=3, lw=1.4, zorder=2)
            xs += [lo, hi]
        else:
            why = s["paired_note"].replace(" pair: no CI, no p-value", ": no CI")
            why = f"same experiment as {ref}" if ref in s["alias_of"] else why
            ax.annotate(why, (d, y), xytext=(7, 0), textcoords="offset points", va="center", fontsize=8, color="#555555")
        ax.plot(d, y, "o", ms=7, color=color, mfc=color if s["significant"] else "white", mew=1.5, zorder=3)
        if s["significant"]:
            ax.annotate("*", (hi if hi == hi else d, y), xytext=(4, -2), textcoords="offset points", va="center",
                        fontsize=12, color=color)
    ax.axvline(0, color="black", lw=1, zorder=1)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{s['variant']}{' ⚠' if s['collapsed'] or s['at_chance'] or s['shortcut'] else ''} "
                        f"(n={s['n_pairs']})" for s in reversed(rows)], fontsize=8)
    ax.set_ylim(-0.7, max(len(rows), 1) - 0.3)
    span = max(xs) - min(xs) or 1.0
    ax.set_xlim(min(xs) - 0.08 * span, max(xs) + 0.35 * span)  # room on the right for the notes
    if not rows:
        ax.text(0.5, 0.5, "only the reference variant: nothing to compare", transform=ax.transAxes, ha="center")
    ax.set_xlabel(f"Δ {metric} vs {ref}{f' ({unit})' if unit else ''}, paired by seed, 95 % CI")
    if rows and all(s["n_pairs"] <= 1 for s in rows):
        title += "\nn = 1: no CI, no test (one seed per variant)"
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", color="#eeeeee", zorder=-1)
    handles = []
    if any(x["p"] == x["p"] for x in rows):
        handles += [Line2D([], [], marker="o", ls="", color="#1f4e79", label=f"Holm p < {stats.ALPHA:g}"),
                    Line2D([], [], marker="o", ls="", color="#1f4e79", mfc="white", label="not significant")]
    if any(x["mde"] == x["mde"] for x in rows):
        handles.append(Patch(color="#d5d8dc", label=f"±MDE ({stats.POWER * 100:.0f} % power, α = {stats.ALPHA:g})"))
    if any(x["collapsed"] or x["at_chance"] or x["shortcut"] for x in rows):
        handles.append(Line2D([], [], marker="o", ls="", color="#c0392b", mfc="white", label="collapsed / chance / shortcut"))
    if handles:
        fig.legend(handles=handles, fontsize=7, loc="outside lower center", ncol=len(handles), frameon=False)
    return fig


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def make_report(source: str | Path, tracking_uri: Optional[str] = None, out_dir: Optional[Path] = None) -> dict:
    """Report of a sweep folder (results.parquet) or of an MLflow experiment by name."""
    from conmim.config import ConfigError
    src = Path(source)
    if (src / "results.parquet").exists():
        rows, title = rows_from_parquet(src), src.name
        state = json.loads((src / "sweep.json").read_text()) if (src / "sweep.json").exists() else {}
        spec = validated_spec(report_spec_of_sweep(state), f"{state.get('sweep_file') or src / 'sweep.json'} (sweep)")
        out_dir = out_dir or src
    else:
        uri = tracking_uri or f"sqlite:///{Path('mlflow.db').resolve()}"
        rows, title, state = rows_from_mlflow(str(source), uri), str(source), {}
        spec = validated_spec(report_spec_from_mlflow(str(source), uri), f"MLflow experiment '{source}' (sweep tags)")
        out_dir = out_dir or Path(".")
    if rows and spec.metric not in rows[0]:
        raise ConfigError(f"report.metric = {spec.metric!r} is not a column of the sweep's results; columns: "
                          f"{', '.join(k for k in rows[0] if k in _metric_names())}.")
    summary = summarize(rows, spec.metric, spec.baseline)
    md = markdown(summary, f"Ablation: {title}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(md)
    ref = summary[0]["reference"] if summary else spec.baseline
    png = forest_plot(summary, out_dir / "report.png", f"{title}: Δ {spec.metric} vs {ref}")
    if state.get("parent_run_id"):
        from conmim import tracking
        c = tracking.client(state["tracking_uri"])
        tracking.retry(c.log_artifact, state["parent_run_id"], str(out_dir / "report.md"))
        tracking.retry(c.log_artifact, state["parent_run_id"], str(png))
    return {"markdown": md, "summary": summary, "png": png, "report": out_dir / "report.md"}
