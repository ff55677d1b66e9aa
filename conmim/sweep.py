"""``conmim sweep``: the ablation grid as Ray Tune trials, each a Ray Train pre-training and
fine-tuning, every trial one MLflow child run, results in ``results.parquet``.

Sweep folder (``storage/name``): ``sweep.json`` (parent run, experiment), ``trials.json`` (the
expansion), ``tune/`` (Ray Tune state, for ``--resume``), ``trials/<name>/`` (checkpoints and
``result.json`` or ``failed.json``), ``results.parquet``, ``report.md`` and ``report.png``."""
from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Optional

from conmim import tracking
from conmim.config import ConfigError, ExperimentConfig, canonical_hash
from conmim.results import write_json
from conmim.sweep_config import Sweep, Trial, check_storage

FINAL_METRICS = ("finetune_top1", "finetune_val_top1", "linear_probe_top1", "knn_top1", "final_pretrain_loss",
                 "final_target_std")
TIMINGS = ("pretrain_seconds", "probe_seconds", "finetune_seconds", "wall_seconds")
STOP_MARKER = ".stopping"   # written by the driver when SIGINT/SIGTERM stops the sweep
NODE_TAG = "conmim.node_id"


# ---------------------------------------------------------------------------------------------
# Pre-flight: everything that can be wrong is found before Ray starts
# ---------------------------------------------------------------------------------------------
def preflight(sweep: Sweep, resume: bool) -> None:
    d = sweep.dir
    check_storage(d, sweep.spec.min_free_gb)  # writable, and not (nearly) full
    if (d / "sweep.json").exists() and not resume:
        raise ConfigError(f"{sweep.path}: a sweep named '{sweep.spec.name}' already exists in {d}; "
                          f"continue it with --resume, or change 'name' or 'storage'.")
    if resume and not (d / "sweep.json").exists():
        raise ConfigError(f"--resume: there is no sweep '{sweep.spec.name}' in {d} to resume.")
    try:
        tracking.check_reachable(sweep.tracking_uri)
    except tracking.TrackingUnavailable as e:
        raise ConfigError(str(e)) from None


def sweep_digest(sweep: Sweep) -> str:
    """What the sweep is, independent of where its file lies: the sweep file's settings after
    ``--set`` (as written, defaults not filled in) and its base experiment. Recorded in
    ``sweep.json``; ``--resume-if-exists`` resumes only a folder made by the same sweep."""
    doc = {"sweep": sweep.spec.model_dump(mode="json", exclude_unset=True), "base": sweep.base_raw}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resume_if_exists(sweep: Sweep) -> bool:
    """``--resume-if-exists``: False for a new sweep folder; True when the folder holds this same
    sweep (same digest); ConfigError when it holds another sweep or one that predates the digest.
    For a job that is stopped and submitted again unchanged (a re-created KubeRay RayJob)."""
    state = _state(sweep)
    if not state:
        return False
    recorded = state.get("sweep_digest")
    if recorded == sweep_digest(sweep):
        return True
    what = (f"was made by another sweep file or other settings (digest {recorded}, this one {sweep_digest(sweep)}; "
            f"recorded sweep file: {state.get('sweep_file', '?')})" if recorded else
            "records no sweep digest (it predates --resume-if-exists), so it cannot be told to be the same sweep")
    raise ConfigError(f"{sweep.path}: --resume-if-exists: the sweep folder {sweep.dir} {what}. Nothing was started. "
                      "Continue it anyway with --resume, or give this sweep another 'name' or 'storage', or delete "
                      "the folder to start over.")


def _state(sweep: Sweep) -> dict:
    p = sweep.dir / "sweep.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _trial_record(t: Trial) -> dict:
    return {"name": t.name, "variant": t.variant, "seed": t.seed, "overrides": t.overrides, "key": t.key,
            "alias_of": t.alias_of, "note": t.note, "config": t.config.to_dict()}


# ---------------------------------------------------------------------------------------------
# One trial (runs inside a Ray Tune trial)
# ---------------------------------------------------------------------------------------------
def run_one_trial(params: dict, info: dict) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from conmim.distributed import TrainRunFailed, run_trial

    sweep_dir = Path(info["sweep_dir"])
    if "trial" in params:
        rec = info["trials"][params["trial"]]
        name, cfg = rec["name"], ExperimentConfig.model_validate(rec["config"])
    else:  # an Optuna sample: overrides come from the sampled parameters
        from conmim.config import build
        overrides = {k: v for k, v in params.items()}
        ctx = tune.get_context()
        name = f"optuna_{ctx.get_trial_id()}"
        cfg = build(info["base_config"], overrides, label="optuna sample", check_paths=False)
        rec = {"name": name, "variant": "optuna", "seed": cfg.seed, "overrides": overrides,
               "key": canonical_hash(cfg), "alias_of": None, "note": "sampled by Optuna", "config": cfg.to_dict()}
        out = sweep_dir / "trials" / name
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "trial.json", rec)
    out = sweep_dir / "trials" / name
    out.mkdir(parents=True, exist_ok=True)
    uri = info["tracking_uri"]
    tags = {"conmim.variant": rec["variant"], "conmim.seed": str(rec["seed"]), "conmim.canonical_hash": rec["key"],
            "conmim.aliases": ",".join(a["name"] for a in info.get("aliases", {}).get(name, [])) or "-",
            "conmim.alias_records": json.dumps(info.get("aliases", {}).get(name, []), default=str)[:5000],
            "conmim.overrides": json.dumps(rec["overrides"], sort_keys=True, default=str)[:5000],
            "conmim.note": rec.get("note", "")[:5000],
            "ray.trial_id": tune.get_context().get_trial_id(), **({"conmim.git_commit": info["git"]} if info.get("git") else {})}
    run = tracking.child_run(uri, info["experiment_id"], info["parent_run_id"], name, tags)
    run_id = run.info.run_id
    stopping = sweep_dir / STOP_MARKER
    if stopping.exists() and run.info.status != "FINISHED":  # started while the driver was stopping
        tracking.end_run(uri, run_id, "KILLED", f"sweep stopped ({stopping.read_text().strip() or 'signal'})")
        return
    result_file = out / "result.json"
    if run.info.status == "FINISHED" and result_file.exists():
        # finished before a driver crash: report it again, do not train twice
        res = json.loads(result_file.read_text())
        tune.report({k: res.get(k) for k in FINAL_METRICS} | {"status": "finished"})
        return
    tracking.log_params(uri, run_id, cfg.flat())
    tracking.log_config(uri, run_id, cfg.to_dict(), out / "config.yaml")  # credentials masked
    pending = out / tracking.PENDING_FILE  # per-epoch metrics wait here while MLflow is unreachable
    callbacks = [TuneReportCallback(), tracking.EpochLogger(uri, run_id, pending)]
    try:
        res = run_trial(cfg, out, callbacks=callbacks)
    except TrainRunFailed as e:  # a divergence (NaN loss) included
        if stopping.exists():  # the workers went down with the sweep: killed, not failed
            tracking.end_run(uri, run_id, "KILLED", f"sweep stopped ({stopping.read_text().strip() or 'signal'})")
            return
        reason = str(e)
        write_json(out / "failed.json", {"reason": reason, "time": time.time()})
        tracking.end_run(uri, run_id, "FAILED", reason)
        tune.report({"status": "failed"})
        return
    except BaseException as e:  # noqa: BLE001 - record, then let Tune see the error
        reason = f"{type(e).__name__}: {e}"
        write_json(out / "failed.json", {"reason": reason, "time": time.time(), "traceback": traceback.format_exc()})
        tracking.end_run(uri, run_id, "FAILED", reason)
        raise
    final = {k: res[k] for k in FINAL_METRICS} | {k: res[k] for k in TIMINGS if k in res}
    final["collapsed"] = float(res["collapsed"])
    final["at_chance"] = float(res["at_chance"])
    tracking.flush_pending(uri, run_id, pending)  # waits for a server that went down mid-trial
    tracking.log_metrics(uri, run_id, final, step=cfg.pretrain.epochs + cfg.finetune.epochs)
    if res.get("node_id"):
        tracking.retry(tracking.client(uri).set_tag, run_id, NODE_TAG, res["node_id"])
    if res["collapsed"] or res["at_chance"]:
        tracking.retry(tracking.client(uri).set_tag, run_id, "conmim.warning",
                       "collapsed pre-training" if res["collapsed"] else "fine-tuned top-1 at chance")
    tracking.end_run(uri, run_id, "FINISHED")
    tune.report({**final, "status": "finished"})


# ---------------------------------------------------------------------------------------------
# Results table
# ---------------------------------------------------------------------------------------------
def collect_rows(sweep_dir: Path) -> list[dict]:
    """One row per trial (aliases included), from what the trials left on disk."""
    trials = json.loads((sweep_dir / "trials.json").read_text())
    for f in sorted((sweep_dir / "trials").glob("optuna_*/trial.json")) if (sweep_dir / "trials").exists() else []:
        trials.append(json.loads(f.read_text()))
    done: dict[str, dict] = {}
    rows = []
    for t in trials:
        out = sweep_dir / "trials" / t["name"]
        row = {"trial": t["name"], "variant": t["variant"], "seed": t["seed"], "note": t.get("note", ""),
               "overrides": json.dumps(t["overrides"], sort_keys=True, default=str), "alias_of": t["alias_of"] or "",
               "canonical_hash": t["key"], "status": "pending", "reason": "", "node_id": ""}
        for k in FINAL_METRICS + TIMINGS:
            row[k] = float("nan")
        row["collapsed"], row["at_chance"] = False, False
        if t["alias_of"] is None:
            if (out / "result.json").exists():
                res = json.loads((out / "result.json").read_text())
                row.update({k: res.get(k, float("nan")) for k in FINAL_METRICS + TIMINGS})
                row.update(status="finished", collapsed=bool(res.get("collapsed")), at_chance=bool(res.get("at_chance")),
                           node_id=res.get("node_id") or "")
            elif (out / "failed.json").exists():
                row.update(status="failed", reason=json.loads((out / "failed.json").read_text())["reason"])
            done[t["name"]] = row
        rows.append(row)
    for row in rows:  # an alias carries the numbers of the trial it is the same experiment as
        if row["alias_of"]:
            src = done.get(row["alias_of"], {})
            for k in FINAL_METRICS + ("collapsed", "at_chance", "node_id"):
                row[k] = src.get(k, row[k])
            row["status"] = f"alias ({src.get('status', 'pending')})"
    return rows


def write_results(sweep_dir: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = collect_rows(sweep_dir)
    table = pa.Table.from_pylist(rows)
    tmp = sweep_dir / ".results.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, sweep_dir / "results.parquet")
    return sweep_dir / "results.parquet"


def _results_callback(sweep_dir: Path):
    from ray.tune import Callback

    class ResultsWriter(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            write_results(sweep_dir)

        def on_trial_error(self, iteration, trials, trial, **info):
            write_results(sweep_dir)

    return ResultsWriter()


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------
def _search(sweep: Sweep):
    from ray import tune
    spec = sweep.spec
    if spec.search == "grid":
        return {"trial": tune.grid_search([t.name for t in sweep.distinct])}, None, 1
    from ray.tune.search.optuna import OptunaSearch
    space = {}
    for key, d in spec.optuna.space.items():
        space[key] = {"loguniform": lambda: tune.loguniform(d.low, d.high), "uniform": lambda: tune.uniform(d.low, d.high),
                      "int": lambda: tune.randint(int(d.low), int(d.high) + 1), "choice": lambda: tune.choice(d.values)}[d.type]()
    space["seed"] = spec.seeds[0]

    class FinalMetricOptuna(OptunaSearch):
        """Per-epoch reports are curves without the final metric: Optuna sees only the final one."""

        def on_trial_result(self, trial_id, result):
            if self.metric in result:
                super().on_trial_result(trial_id, result)

    algo = FinalMetricOptuna(metric=spec.optuna.metric, mode=spec.optuna.mode, seed=spec.seeds[0])
    return space, algo, spec.optuna.num_samples


def _scheduler(sweep: Sweep):
    if sweep.spec.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler
    a = sweep.spec.asha
    max_t = sweep.distinct[0].config.pretrain.epochs + sweep.distinct[0].config.finetune.epochs + 1
    return ASHAScheduler(metric=a.metric, mode=a.mode, grace_period=a.grace_period, reduction_factor=a.reduction_factor,
                         max_t=max(max_t, a.grace_period + 1), time_attr="training_iteration")


class SweepStopped(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the sweep's driver; ``signame`` says which."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


class _SignalStop:
    """SIGINT (Ctrl-C) and SIGTERM (``ray job stop``, which sends SIGKILL a grace period later)
    raise ``SweepStopped`` in the driver, so one code path ends the trials' runs and the parent
    run as KILLED. The marker file tells trials still running that the sweep is going down."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, marker: Path):
        self.marker, self.signame, self.stopping, self.saved = marker, None, False, {}

    def install(self) -> None:
        import signal
        import threading
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            prev = signal.signal(sig, self._handle)
            self.saved.setdefault(sig, prev)

    def restore(self) -> None:
        import signal
        for sig, prev in self.saved.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self.saved = {}

    def _handle(self, signum, frame):
        import signal
        name = signal.Signals(signum).name
        if self.stopping:
            print(f"[conmim] {name}: already stopping, ending the MLflow runs", flush=True)
            return
        self.stopping, self.signame = True, name
        print(f"[conmim] {name}: stopping the sweep; its trials' MLflow runs end as KILLED", flush=True)
        try:
            self.marker.write_text(name)
        except OSError:
            pass
        raise SweepStopped(name)


def run_sweep(sweep: Sweep, resume: bool = False, address: Optional[str] = None, report: bool = True) -> dict:
    """Run (or resume) a sweep; returns counts by status. Bad input raises ConfigError first."""
    preflight(sweep, resume)
    from conmim.distributed import ensure_ray
    d, uri = sweep.dir, sweep.tracking_uri
    state = _state(sweep)
    exp_id = tracking.experiment_id(uri, sweep.experiment)
    parent_id = tracking.parent_run(uri, exp_id, sweep.spec.name, state.get("parent_run_id"))
    state.update(name=sweep.spec.name, tracking_uri=uri, experiment=sweep.experiment, experiment_id=exp_id,
                 parent_run_id=parent_id, sweep_file=str(sweep.path.resolve()), sweep_digest=sweep_digest(sweep))
    write_json(d / "sweep.json", state)
    write_json(d / "trials.json", [_trial_record(t) for t in sweep.distinct + sweep.aliases])
    aliases: dict[str, list[dict]] = {}
    for t in sweep.aliases:
        aliases.setdefault(t.alias_of, []).append({"name": t.name, "variant": t.variant, "seed": t.seed,
                                                   "overrides": t.overrides, "note": t.note})
    info = {"sweep_dir": str(d), "tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent_id,
            "trials": {t.name: _trial_record(t) for t in sweep.distinct}, "aliases": aliases,
            "git": tracking.git_commit(), "base_config": sweep.distinct[0].config.to_dict()}
    if sweep.spec.search == "optuna":
        info["trials"] = {}
    write_results(d)

    # Per-epoch reports carry pre-training/fine-tuning curves; the searcher's final metric comes
    # only with the trial's last report, which Tune's strict check would refuse.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Ctrl-C (SIGINT) and `ray job stop` (SIGTERM) stop the sweep alike, through _SignalStop below.
    # Tune's own SIGINT handler would instead end the loop quietly and return as if it had finished.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    (d / STOP_MARKER).unlink(missing_ok=True)
    stop = _SignalStop(d / STOP_MARKER)
    status = "FINISHED"
    try:
        stop.install()
        ensure_ray(address)
        stop.install()  # again: ray.init sets a SIGTERM handler of its own (sys.exit)
        from ray import tune
        r = sweep.spec.resources
        trainable = tune.with_resources(tune.with_parameters(run_one_trial, info=info), {"cpu": 0.5})
        tune_dir = d / "tune"
        if resume and tune.Tuner.can_restore(str(tune_dir / "sweep")):
            tuner = tune.Tuner.restore(str(tune_dir / "sweep"), trainable, resume_unfinished=True, resume_errored=True)
        else:
            space, algo, num_samples = _search(sweep)
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(search_alg=algo, scheduler=_scheduler(sweep), num_samples=num_samples,
                                            max_concurrent_trials=r.max_concurrent_trials,
                                            trial_name_creator=lambda t: f"trial_{t.trial_id}",
                                            trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
                run_config=tune.RunConfig(name="sweep", storage_path=str(tune_dir),
                                          failure_config=tune.FailureConfig(max_failures=sweep.spec.max_failures),
                                          callbacks=[_results_callback(d)]),
            )
        grid = tuner.fit()
        if grid.num_errors:
            status = "FAILED" if grid.num_errors == len(grid) else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        stop.stopping = True  # a second signal must not cut the bookkeeping short
        killed = f"sweep stopped ({stop.signame}{', e.g. ray job stop' if stop.signame == 'SIGTERM' else ''})" \
            if stop.signame and stop.signame != "SIGINT" else "sweep interrupted (Ctrl-C)"
        reason = {"KILLED": killed, "FAILED": "sweep failed"}.get(status, "trial stopped early by the scheduler")
        tracking.close_open_children(uri, exp_id, parent_id, "KILLED" if status != "FAILED" else "FAILED", reason)
        write_results(d)
        if report and status != "KILLED":
            try:
                from conmim.report import make_report
                make_report(d)
            except Exception as e:  # noqa: BLE001 - the sweep's results are safe on disk either way
                print(f"[report] could not write the report: {e}")
        tracking.end_run(uri, parent_id, status, reason if status == "KILLED" else None)
        stop.restore()
    rows = json.loads(json.dumps(collect_rows(d), default=str))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts
