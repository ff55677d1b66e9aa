"""The forest plot: Δ vs the reference variant with its 95 % CI per variant, a zero line, the
minimum detectable effect."""
from __future__ import annotations

from pathlib import Path

from conmim import stats
from conmim.report.table import DEFAULT_BASELINE, DEFAULT_METRIC, flagged, metric_scale


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
        bad = flagged(s)
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
    if any(flagged(x) for x in rows):
        handles.append(Line2D([], [], marker="o", ls="", color="#c0392b", mfc="white", label="collapsed / diverged / chance / shortcut"))
    if handles:
        fig.legend(handles=handles, fontsize=7, loc="outside lower center", ncol=len(handles), frameon=False)
    return fig
