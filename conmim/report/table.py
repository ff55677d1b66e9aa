"""The ablation table: per variant, the primary metric over seeds and its paired difference from
the reference variant (Δ, 95 % CI, p, Holm-adjusted p, the minimum detectable effect), and the
secondary columns (probes, which encoder they used, the collapse and shortcut flags)."""
from __future__ import annotations

import json
import math
from typing import Any

from conmim import stats

DEFAULT_METRIC = "finetune_top1"
DEFAULT_BASELINE = "baseline"


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
            "diverged": sum(_flag(r.get("diverged")) for r in rs),
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


def flagged(s: dict) -> bool:
    """A summary row some of whose trials measure a failure (collapse, divergence, chance, shortcut)."""
    return bool(s["collapsed"] or s["diverged"] or s["at_chance"] or s["shortcut"])


def _collapse_warning(summary: list[dict]) -> list[str]:
    """Numbers that lie: a collapsed or diverged pre-training, a chance-level fine-tune or a
    pre-training task solved by position is said up front."""
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
    diverged = sum(s["diverged"] for s in summary)
    if diverged:
        who = ", ".join(s["variant"] for s in summary if s["diverged"])
        lines += [f"**⚠ {diverged} of {n} finished trials diverged in pre-training** ({who}): the loss rose above "
                  f"chance (ln of the dictionary size) after warm-up or ended above it, so their numbers measure an "
                  f"unstable recipe (an lr or warm-up the arm does not tolerate), not the role of the ablated "
                  f"component.", ""]
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
        if s["diverged"]:
            notes.append(f"{s['diverged']} diverged")
        if s["failed"]:
            notes.append(f"{s['failed']} failed")
        if s["n"] < s["planned"] and not s["failed"]:
            notes.append(f"{s['planned'] - s['n']} unfinished")
        flag = (" ⚠ COLLAPSED" if s["collapsed"] else "") + (" ⚠ AT CHANCE" if s["at_chance"] and not s["collapsed"] else "") \
            + (" ⚠ POSITIONAL SHORTCUT" if s["shortcut"] else "") + (" ⚠ DIVERGED" if s["diverged"] else "")
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
