"""``conmim report``: the sweep as a paper-style ablation table, with a bar chart."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

# two-sided 95 % Student-t quantiles by degrees of freedom (1..30); normal beyond
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t95(dof: int) -> float:
    return _T95[dof - 1] if 1 <= dof <= 30 else 1.96


def mean_std_ci(xs: list[float]) -> tuple[float, float, float]:
    xs = [x for x in xs if x == x]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    m = sum(xs) / n
    if n == 1:
        return m, float("nan"), float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, sd, t95(n - 1) * sd / math.sqrt(n)


def rows_from_parquet(sweep_dir: Path) -> list[dict]:
    import pyarrow.parquet as pq
    return pq.read_table(sweep_dir / "results.parquet").to_pylist()


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
                **{k: m.get(k, float("nan")) for k in ("finetune_top1", "linear_probe_top1", "knn_top1", "final_target_std")}}
        rows.append(base)
        for a in json.loads(t.get("conmim.alias_records", "[]")):
            rows.append({**base, "trial": a["name"], "variant": a["variant"], "seed": a["seed"], "note": a["note"],
                         "overrides": json.dumps(a["overrides"], sort_keys=True), "alias_of": base["trial"],
                         "status": f"alias ({status})"})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per variant, in first-seen order: mean/std/CI of fine-tuned top-1 over seeds, deltas, proxies."""
    order: list[str] = []
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["variant"] not in groups:
            order.append(r["variant"])
        groups.setdefault(r["variant"], []).append(r)
    out = []
    for v in order:
        rs = [r for r in groups[v] if str(r["status"]).startswith(("finished", "alias (finished"))]
        m, sd, ci = mean_std_ci([100 * r["finetune_top1"] for r in rs])
        out.append({
            "variant": v, "n": len(rs), "planned": len(groups[v]), "mean": m, "std": sd, "ci95": ci,
            "linear_probe": mean_std_ci([100 * r["linear_probe_top1"] for r in rs])[0],
            "knn": mean_std_ci([100 * r["knn_top1"] for r in rs])[0],
            "target_std": mean_std_ci([r.get("final_target_std", float("nan")) for r in rs])[0],
            "collapsed": sum(bool(r["collapsed"]) for r in rs), "at_chance": sum(bool(r["at_chance"]) for r in rs),
            "failed": sum(str(r["status"]).startswith("failed") or "failed" in str(r["status"]) for r in groups[v]),
            "alias_of": sorted({r["alias_of"].rsplit("_seed", 1)[0] for r in groups[v] if r.get("alias_of")}),
            "changed": groups[v][0].get("note") or _overrides_text(groups[v][0].get("overrides", "")),
        })
    base = next((s for s in out if s["variant"] == "baseline"), out[0] if out else None)
    for s in out:
        s["delta"] = s["mean"] - base["mean"] if base else float("nan")
        # Welch-style check: do the two 95 % intervals of the means exclude each other's mean?
        s["significant"] = bool(base and s is not base and s["ci95"] == s["ci95"] and base["ci95"] == base["ci95"]
                                and abs(s["delta"]) > math.sqrt(s["ci95"] ** 2 + base["ci95"] ** 2))
    return out


def _overrides_text(ov: str) -> str:
    try:
        d = json.loads(ov) if ov else {}
    except json.JSONDecodeError:
        return ov
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "-"


def _fmt(x: float, nd: int = 2) -> str:
    return "–" if x != x else f"{x:.{nd}f}"


def _collapse_warning(summary: list[dict]) -> list[str]:
    """Numbers that lie: a collapsed pre-training or a chance-level fine-tune is said up front."""
    n = sum(s["n"] for s in summary)
    collapsed, chance = sum(s["collapsed"] for s in summary), sum(s["at_chance"] for s in summary)
    if not (collapsed or chance):
        return []
    who = ", ".join(s["variant"] for s in summary if s["collapsed"] or s["at_chance"])
    return [f"**⚠ {collapsed} of {n} finished trials collapsed** (target feature spread < 0.1) and {chance} "
            f"fine-tuned to within 5 points of chance ({who}): their top-1 measures a failed pre-training, "
            f"not the ablated component.", ""]


def markdown(summary: list[dict], title: str) -> str:
    lines = [f"# {title}", "",
             "Fine-tuned top-1 (%) over seeds: mean ± std, 95 % CI half-width (Student t), Δ vs baseline; "
             "`*` marks a Δ larger than the combined 95 % intervals. Proxies: linear probe and k-NN top-1 "
             "on frozen pre-trained features. Target spread: std of the momentum targets across patches at "
             "the end of pre-training, the collapse indicator (< 0.1 = collapsed).", "",
             *_collapse_warning(summary),
             "| variant | what changed | top-1 | ± 95 % CI | Δ | n | linear probe | k-NN | target spread | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        notes = []
        if s["alias_of"]:
            notes.append(f"same experiment as {', '.join(s['alias_of'])}")
        if s["collapsed"]:
            notes.append(f"{s['collapsed']} collapsed")
        if s["at_chance"]:
            notes.append(f"{s['at_chance']} at chance")
        if s["failed"]:
            notes.append(f"{s['failed']} failed")
        if s["n"] < s["planned"] and not s["failed"]:
            notes.append(f"{s['planned'] - s['n']} unfinished")
        delta = "0" if s["variant"] == "baseline" else (_fmt(s["delta"]) + ("*" if s["significant"] else ""))
        flag = " ⚠ COLLAPSED" if s["collapsed"] else (" ⚠ AT CHANCE" if s["at_chance"] else "")
        lines.append(f"| {s['variant']} | {s['changed']} | {_fmt(s['mean'])} ± {_fmt(s['std'])}{flag} | {_fmt(s['ci95'])} | "
                     f"{delta} | {s['n']} | {_fmt(s['linear_probe'])} | {_fmt(s['knn'])} | {_fmt(s['target_std'], 3)} | "
                     f"{'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def bar_chart(summary: list[dict], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [s["variant"] for s in summary]
    means = [s["mean"] for s in summary]
    errs = [0 if s["ci95"] != s["ci95"] else s["ci95"] for s in summary]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 4.5))
    colors = ["#444444" if n == "baseline" else ("#c0392b" if s["collapsed"] else "#2e86c1") for n, s in zip(names, summary)]
    ax.bar(range(len(names)), means, yerr=errs, capsize=4, color=colors)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
    finite = [m for m in means if m == m]
    if finite:
        lo = min(finite) - max(errs + [0]) - 2
        ax.set_ylim(max(0, lo), min(100, max(finite) + max(errs + [0]) + 2))
    ax.set_ylabel("fine-tuned top-1 (%), 95 % CI")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_report(source: str | Path, tracking_uri: Optional[str] = None, out_dir: Optional[Path] = None) -> dict:
    """Report of a sweep folder (results.parquet) or of an MLflow experiment by name."""
    src = Path(source)
    if (src / "results.parquet").exists():
        rows, title = rows_from_parquet(src), src.name
        state = json.loads((src / "sweep.json").read_text()) if (src / "sweep.json").exists() else {}
        out_dir = out_dir or src
    else:
        uri = tracking_uri or f"sqlite:///{Path('mlflow.db').resolve()}"
        rows, title, state = rows_from_mlflow(str(source), uri), str(source), {}
        out_dir = out_dir or Path(".")
    summary = summarize(rows)
    md = markdown(summary, f"Ablation: {title}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(md)
    png = bar_chart(summary, out_dir / "report.png", title)
    if state.get("parent_run_id"):
        from conmim import tracking
        c = tracking.client(state["tracking_uri"])
        tracking.retry(c.log_artifact, state["parent_run_id"], str(out_dir / "report.md"))
        tracking.retry(c.log_artifact, state["parent_run_id"], str(png))
    return {"markdown": md, "summary": summary, "png": png, "report": out_dir / "report.md"}
