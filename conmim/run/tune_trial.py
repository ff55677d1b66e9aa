"""One Ray Tune trial: the Tune function trainable that runs a trial's Ray Train run and keeps its
MLflow child run and its files in step with it. It runs in the trial's own process, which never
imports torch's model code nor loads the data (the Train worker does)."""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from conmim.config.experiment import ExperimentConfig
from conmim.config.identity import canonical_hash
from conmim.files import write_json
from conmim.run.results import FAILED_FILE
from conmim.run.stop import stopping
from conmim.tracking import client as mlflow_runs
from conmim.tracking import tags as T
from conmim.tracking.buffer import PENDING_FILE, flush_pending
from conmim.trial import TrialResult, trial_warnings


def trial_record(name, variant, seed, overrides, key, alias_of, note, config: dict) -> dict:
    """A trial as ``trials.json`` holds it (the Tune trial reads its config from here)."""
    return {"name": name, "variant": variant, "seed": seed, "overrides": overrides, "key": key,
            "alias_of": alias_of, "note": note, "config": config}


def _sampled_trial(params: dict, info: dict, sweep_dir: Path) -> dict:
    """An Optuna sample as a trial record (written once, so the results table finds it)."""
    from ray import tune
    from conmim.config.loading import build
    cfg = build(info["base_config"], dict(params), label="optuna sample", check_paths=False)
    name = f"optuna_{tune.get_context().get_trial_id()}"
    rec = trial_record(name, "optuna", cfg.seed, dict(params), canonical_hash(cfg), None, "sampled by Optuna",
                       cfg.to_dict())
    out = sweep_dir / "trials" / name
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "trial.json", rec)
    return rec


def _tags(rec: dict, info: dict, ray_trial_id: str) -> dict:
    aliases = info["aliases"].get(rec["name"], [])
    warnings = info.get("warnings", {}).get(rec["name"])
    return {**({T.WARNING: "; ".join(warnings)[:5000]} if warnings else {}),
            T.VARIANT: rec["variant"], T.SEED: str(rec["seed"]), T.CANONICAL_HASH: rec["key"],
            T.ALIASES: ",".join(a["name"] for a in aliases) or "-",
            T.ALIAS_RECORDS: json.dumps(aliases, default=str)[:5000],
            T.OVERRIDES: json.dumps(rec["overrides"], sort_keys=True, default=str)[:5000],
            T.NOTE: rec.get("note", "")[:5000],
            T.RAY_TRIAL_ID: ray_trial_id, **({T.GIT_COMMIT: info["git"]} if info.get("git") else {}),
            **({T.STAGE: info["stage"]} if info.get("stage") else {})}


def warning_tag(res: TrialResult) -> str:
    """The ``conmim.warning`` tag of a finished trial's run: the data's warnings, then its flags in
    words (collapsed, at chance, diverged, ...); empty when its flags raise none."""
    flagged = trial_warnings(res.flags)
    return "; ".join(res.warnings + flagged)[:5000] if flagged else ""


def run_one_trial(params: dict, info: dict) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from conmim.run.ray_train import TrialRunFailed, run_trial
    from conmim.tracking.callback import EpochLogger

    sweep_dir = Path(info["sweep_dir"])
    rec = info["trials"][params["trial"]] if "trial" in params else _sampled_trial(params, info, sweep_dir)
    name, cfg = rec["name"], ExperimentConfig.model_validate(rec["config"])
    out = sweep_dir / "trials" / name
    out.mkdir(parents=True, exist_ok=True)
    uri = info["tracking_uri"]
    run = mlflow_runs.child_run(uri, info["experiment_id"], info["parent_run_id"], name,
                                _tags(rec, info, tune.get_context().get_trial_id()))
    run_id = run.info.run_id
    if (why := stopping(sweep_dir)) and run.info.status != "FINISHED":  # started while the driver was stopping
        mlflow_runs.end_run(uri, run_id, "KILLED", why)
        return
    done = TrialResult.read(out)
    if run.info.status == "FINISHED" and done is not None:
        # finished before a driver crash: report it again, do not train twice
        tune.report({**done.metrics, "status": "finished"})
        return
    mlflow_runs.log_params(uri, run_id, cfg.flat())
    mlflow_runs.log_config(uri, run_id, cfg.to_dict(), out / "config.yaml")  # credentials masked
    pending = out / PENDING_FILE  # per-epoch metrics wait here while MLflow is unreachable
    try:
        res = run_trial(cfg, out, callbacks=[TuneReportCallback(), EpochLogger(uri, run_id, pending)],
                        warnings=info.get("warnings", {}).get(name))
    except TrialRunFailed as e:  # a divergence (NaN loss) included
        if why := stopping(sweep_dir):  # the workers went down with the sweep: killed, not failed
            mlflow_runs.end_run(uri, run_id, "KILLED", why)
            return
        write_json(out / FAILED_FILE, {"reason": e.failure.reason, "kind": e.failure.kind, "time": time.time()})
        mlflow_runs.end_run(uri, run_id, "FAILED", e.failure.reason)
        tune.report({"status": "failed"})
        return
    except BaseException as e:  # noqa: BLE001 - record, then let Tune see the error
        if why := stopping(sweep_dir):  # e.g. Ray cancelling the Train run's controller as the sweep goes down
            mlflow_runs.end_run(uri, run_id, "KILLED", why)
            raise
        reason = f"{type(e).__name__}: {e}"
        write_json(out / FAILED_FILE, {"reason": reason, "kind": "error", "time": time.time(),
                                       "traceback": traceback.format_exc()})
        mlflow_runs.end_run(uri, run_id, "FAILED", reason)
        raise
    final = {**res.metrics, **res.timings, **{k: float(v) for k, v in res.flags.items()}}
    flush_pending(uri, run_id, pending)  # waits for a server that went down mid-trial
    mlflow_runs.log_metrics(uri, run_id, final, step=cfg.pretrain.epochs + cfg.finetune.epochs)
    c = mlflow_runs.client(uri)
    if res.node_id:
        mlflow_runs.retry(c.set_tag, run_id, T.NODE_ID, res.node_id)
    if res.machine:
        mlflow_runs.retry(c.set_tag, run_id, T.MACHINE, res.machine)
    if tag := warning_tag(res):
        mlflow_runs.retry(c.set_tag, run_id, T.WARNING, tag)
    mlflow_runs.end_run(uri, run_id, "FINISHED")
    tune.report({**final, "status": "finished"})
