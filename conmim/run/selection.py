"""A fair ablation in two stages (a sweep file's ``selection`` section).

An arm that needs another lr or warm-up than the baseline's would be penalised for it by a
comparison at one shared setting, and its row would measure that, not the component it removes.
So every arm gets the same declared budget of settings, and its own setting is chosen:

1. **selection**: every arm x every setting of the budget x the selection seeds, as a sweep of
   its own (``STORAGE/NAME.selection``, MLflow experiment ``EXPERIMENT.selection``, its runs tagged
   ``conmim.stage=selection``); each arm's setting is the best mean of ``selection.metric``, a
   validation-split metric, over the selection seeds. A setting that diverged on any seed (or
   failed) is never chosen while the arm has a stable one; an arm whose every setting diverged
   gets its best diverged one, and the choice says so.
2. **comparison**: the sweep's seeds, each arm at its choice (``NAME``, as a sweep without
   selection). Its report shows each arm's choice and the selection table.

The choice is a function of the selection stage's results only, so ``--resume`` of either stage
gives the same comparison; it is kept in ``NAME/selection.json``."""
from __future__ import annotations

import json
import math
from typing import Any

from conmim.config.errors import ConfigError
from conmim.config.expand import Sweep, arms, load_sweep, selection_stage
from conmim.files import write_json
from conmim.report.selection import SELECTION_FILE
from conmim.stats import mean_sd_ci
from conmim.trial import TrialResult

def selection_value(result: TrialResult, metric: str) -> float:
    """A trial's selection metric: a final metric, or a per-epoch one (``knn_proxy_top1``) at its
    last pre-training epoch."""
    if metric in result.metrics:
        return float(result.metrics[metric])
    for h in reversed(result.pretrain_history):
        if metric in h:
            return float(h[metric])
    return float("nan")


def choose(stage: Sweep, metric: str, mode: str) -> dict[str, Any]:
    """Each arm's setting from the selection stage's trial folders: ``{"chosen": {arm: setting},
    "table": [{arm, setting, values, mean, sd, diverged, failed, eligible, chosen}], "all_diverged":
    [arm], ...}``. ConfigError when an arm has no setting that finished on every selection seed."""
    table: list[dict] = []
    for arm in arms(stage.spec):
        rows: dict[str, dict] = {}
        for t in (t for t in stage.trials if t.arm == arm):
            key = json.dumps(t.setting, sort_keys=True, default=str)
            row = rows.setdefault(key, {"arm": arm, "setting": t.setting, "values": {}, "diverged": 0, "failed": 0,
                                        "same_as": set()})
            res = TrialResult.read(stage.dir / "trials" / (t.alias_of or t.name))
            if res is None:
                row["failed"] += 1
                continue
            row["values"][t.seed] = selection_value(res, metric)
            row["diverged"] += bool(res.flags.get("diverged"))
            if t.alias_of:
                row["same_as"].add(t.alias_of.rsplit("_seed", 1)[0])
        for row in rows.values():
            vals = list(row["values"].values())
            row["mean"], row["sd"], _ = mean_sd_ci(vals)
            row["same_as"] = sorted(row["same_as"])
            row["eligible"] = not row["failed"] and len(vals) == len(stage.spec.seeds) and \
                all(math.isfinite(x) for x in vals)
        table += rows.values()
    chosen, all_diverged = {}, []
    sign = 1 if mode == "max" else -1
    for arm in arms(stage.spec):
        rows = [r for r in table if r["arm"] == arm and r["eligible"]]
        if not rows:
            raise ConfigError(f"selection: no setting of arm '{arm}' finished on every selection seed "
                              f"({stage.dir}); resume the sweep to retry its failed trials, or widen selection.budget.")
        stable = [r for r in rows if not r["diverged"]] or rows
        if not any(not r["diverged"] for r in rows):
            all_diverged.append(arm)
        best = max(stable, key=lambda r: sign * r["mean"])  # (ties: the first setting of the budget)
        best["chosen"] = True
        chosen[arm] = best["setting"]
    for r in table:
        r.setdefault("chosen", False)
    return {"metric": metric, "mode": mode, "seeds": stage.spec.seeds, "chosen": chosen, "all_diverged": all_diverged,
            "table": table, "selection_dir": str(stage.dir)}


def run_two_stage(sweep: Sweep, sets: list[str], resume: bool, echo=print, check_paths: bool = True) -> tuple[Sweep, dict]:
    """Selection, then the comparison at each arm's choice; returns the comparison's sweep and counts."""
    from conmim.run.tune import preflight, run_sweep
    sel = sweep.spec.selection
    stage = selection_stage(sweep, check_paths)
    if resume and not (stage.dir / "sweep.json").exists() and not (sweep.dir / "sweep.json").exists():
        raise ConfigError(f"--resume: there is no sweep '{sweep.spec.name}' (nor its selection stage "
                          f"'{stage.spec.name}') in {sweep.dir.parent} to resume.")
    # both folders are checked before anything runs: a comparison that cannot start is known now
    preflight(stage, resume and (stage.dir / "sweep.json").exists())
    preflight(sweep, resume and (sweep.dir / "sweep.json").exists())
    echo(f"selection stage: {len(stage.distinct)} trials ({len(arms(sweep.spec))} arms x "
         f"{len(stage.trials) // max(len(arms(sweep.spec)) * len(sel.seeds), 1)} settings x seeds {sel.seeds}), "
         f"choosing each arm's setting on {sel.metric}")
    run_sweep(stage, resume=resume and (stage.dir / "sweep.json").exists(), report=False, echo=echo)
    choice = choose(stage, sel.metric, sel.mode)
    for arm, setting in choice["chosen"].items():
        flag = " (every setting diverged)" if arm in choice["all_diverged"] else ""
        echo(f"selection: {arm} -> {', '.join(f'{k}={v}' for k, v in setting.items())}{flag}")
    compare = load_sweep(str(sweep.path), sets, check_paths, chosen=choice["chosen"])
    compare.dir.mkdir(parents=True, exist_ok=True)
    write_json(compare.dir / SELECTION_FILE, choice)
    counts = run_sweep(compare, resume=resume and (compare.dir / "sweep.json").exists(), echo=echo)
    return compare, counts
