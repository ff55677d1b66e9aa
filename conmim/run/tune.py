"""``conmim sweep``: the expanded sweep as Ray Tune trials (a grid of the distinct trials, or
Optuna samples with ASHA), each a Ray Train run (:mod:`.tune_trial`), every trial one MLflow child
run under the sweep's parent run, results in ``results.parquet`` and a report.

Sweep folder (``storage/name``): ``sweep.json`` (parent run, experiment, report spec),
``trials.json`` (the expansion), ``tune/`` (Ray Tune state, for ``--resume``), ``trials/<name>/``
(checkpoints, ``train.log``, ``result.json`` or ``failed.json``), ``ray.log`` (Ray's own messages),
``results.parquet``, ``report.md`` and ``report.png``."""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from conmim.config.errors import ConfigError
from conmim.config.expand import Sweep, check_storage
from conmim.files import write_json
from conmim.run.console import SweepConsole, live, mlflow_links, send_ray_logs_to
from conmim.run.results import collect_rows, write_results
from conmim.run.stop import SignalStop
from conmim.run.tune_trial import run_one_trial, trial_record
from conmim.tracking import client as mlflow_runs
from conmim.tracking import tags as T

# A trial's Tune process (run_one_trial) imports Ray Tune and Train, torch and MLflow: ~9 s of a
# core, paid per trial when each trial gets a new process. Reused, the next trial starts in the
# process the last one left, as soon as it ends (benchmarks/sweep_overhead.py --compare-reuse).
# run_one_trial keeps nothing between calls; a trial that raised gets a fresh process (Tune's rule).
REUSE_TRIAL_PROCESSES = True


def preflight(sweep: Sweep, resume: bool, echo=print) -> dict[str, list[str]]:
    """Everything that can be wrong is found before Ray starts (ConfigError, exit 2), the data
    first (:mod:`conmim.data.preflight`, before the sweep folder is made); returns each trial's
    data warnings."""
    from conmim.data.preflight import check_sweep
    warnings = check_sweep(sweep, echo=echo)
    d = sweep.dir
    check_storage(d, sweep.spec.min_free_gb)  # writable, and not (nearly) full
    if (d / "sweep.json").exists() and not resume:
        raise ConfigError(f"{sweep.path}: a sweep named '{sweep.spec.name}' already exists in {d}; "
                          f"continue it with --resume, or change 'name' or 'storage'.")
    if resume and not (d / "sweep.json").exists():
        raise ConfigError(f"--resume: there is no sweep '{sweep.spec.name}' in {d} to resume.")
    try:
        mlflow_runs.check_reachable(sweep.tracking_uri)
    except mlflow_runs.TrackingUnavailable as e:
        raise ConfigError(str(e)) from None
    return warnings


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
    p = sweep.dir / "sweep.json"
    state = json.loads(p.read_text()) if p.exists() else {}
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


def _search(sweep: Sweep):
    from ray import tune
    spec = sweep.spec
    if spec.search == "grid":
        return {"trial": tune.grid_search([t.name for t in sweep.distinct])}, None, 1
    from ray.tune.search.optuna import OptunaSearch
    make = {"loguniform": lambda d: tune.loguniform(d.low, d.high), "uniform": lambda d: tune.uniform(d.low, d.high),
            "int": lambda d: tune.randint(int(d.low), int(d.high) + 1), "choice": lambda d: tune.choice(d.values)}
    space = {key: make[d.type](d) for key, d in spec.optuna.space.items()}
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


def _run_config(sweep: Sweep, tune_dir: Path, callbacks: list):
    """Tune's run settings. ``max_failures``: Tune retries a trial whose function raised (an error
    outside its Ray Train run, e.g. its storage or MLflow) or whose process died; a failure the
    Train run reports (a worker death beyond ``resources.max_failures``, an exception in training,
    a NaN) ends the trial FAILED and is not retried."""
    from ray import tune
    return tune.RunConfig(name="sweep", storage_path=str(tune_dir), verbose=0,
                          failure_config=tune.FailureConfig(max_failures=sweep.spec.max_failures), callbacks=callbacks)


def _results_writer(sweep_dir: Path):
    from ray.tune import Callback

    class ResultsWriter(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            write_results(sweep_dir)

        def on_trial_error(self, iteration, trials, trial, **info):
            write_results(sweep_dir)

    return ResultsWriter()


def _records(sweep: Sweep) -> list[dict]:
    return [trial_record(t.name, t.variant, t.seed, t.overrides, t.key, t.alias_of, t.note, t.config.to_dict())
            for t in sweep.distinct + sweep.aliases]


def _start_runs(sweep: Sweep) -> dict:
    """The MLflow experiment and parent run (found again on --resume), ``sweep.json``, ``trials.json``."""
    d, uri, spec = sweep.dir, sweep.tracking_uri, sweep.spec
    p = d / "sweep.json"
    state = json.loads(p.read_text()) if p.exists() else {}
    exp_id = mlflow_runs.experiment_id(uri, sweep.experiment)
    # MLflow 3 opens an experiment without this tag in its GenAI view (traces, judges, prompts)
    mlflow_runs.retry(mlflow_runs.client(uri).set_experiment_tag, exp_id, T.EXPERIMENT_KIND, T.TRAINING_KIND)
    # ... and the printed trials link opens this saved view of its runs table: trials flat, with their metrics
    mlflow_runs.retry(mlflow_runs.client(uri).set_experiment_tag, exp_id, T.TRIALS_VIEW,
                      mlflow_runs.trials_view(spec.report.metric))
    parent_id = mlflow_runs.parent_run(uri, exp_id, spec.name, state.get("parent_run_id"))
    c = mlflow_runs.client(uri)
    mlflow_runs.retry(c.set_tag, parent_id, T.REPORT_METRIC, spec.report.metric)
    mlflow_runs.retry(c.set_tag, parent_id, T.REPORT_BASELINE, spec.report.baseline)
    if sweep.stage:
        mlflow_runs.retry(c.set_tag, parent_id, T.STAGE, sweep.stage)
    state.update(name=spec.name, tracking_uri=uri, experiment=sweep.experiment, experiment_id=exp_id,
                 parent_run_id=parent_id, sweep_file=str(sweep.path.resolve()), report=spec.report.model_dump(),
                 sweep_digest=sweep_digest(sweep))
    write_json(d / "sweep.json", state)
    write_json(d / "trials.json", _records(sweep))
    return state


def run_sweep(sweep: Sweep, resume: bool = False, report: bool = True, echo=print) -> dict:
    """Run (or resume) a sweep; returns counts by status. Bad input raises ConfigError first.
    ``echo`` gets the console's lines (one per trial event, a progress bar, where things are)."""
    data_warnings = preflight(sweep, resume, echo)
    for w in dict.fromkeys(w for ws in data_warnings.values() for w in ws):
        echo(f"warning: {w}")
    from conmim.run.ray_train import ensure_ray
    d, uri = sweep.dir, sweep.tracking_uri
    state = _start_runs(sweep)
    exp_id, parent_id = state["experiment_id"], state["parent_run_id"]
    aliases: dict[str, list[dict]] = {}
    for t in sweep.aliases:
        aliases.setdefault(t.alias_of, []).append({"name": t.name, "variant": t.variant, "seed": t.seed,
                                                   "overrides": t.overrides, "note": t.note})
    records = {r["name"]: r for r in _records(sweep) if r["alias_of"] is None}
    info = {"sweep_dir": str(d), "tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent_id,
            "trials": records if sweep.spec.search == "grid" else {}, "aliases": aliases,
            "git": mlflow_runs.git_commit(), "base_config": sweep.distinct[0].config.to_dict(),
            "warnings": data_warnings, "stage": sweep.stage}
    write_results(d)

    # Per-epoch reports carry pre-training/fine-tuning curves; the searcher's final metric comes
    # only with the trial's last report, which Tune's strict check would refuse.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Ctrl-C (SIGINT) and `ray job stop` (SIGTERM) stop the sweep alike, through SignalStop.
    # Tune's own SIGINT handler would instead end the loop quietly and return as if it had finished.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # The sweep prints its own console (run/console.py). Ray's new output engine prints its
    # experiment table and a TensorBoard hint even at verbose=0; its legacy reporter at 0 is silent.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    def end_runs(reason: str) -> None:  # the trials' runs and the parent's: KILLED, with the reason
        mlflow_runs.close_open_children(uri, exp_id, parent_id, "KILLED", reason)
        mlflow_runs.end_run(uri, parent_id, "KILLED", reason)

    stop = SignalStop(d, on_stop=end_runs)
    links = mlflow_links(uri, exp_id, parent_id, d)
    console = SweepConsole(sweep, echo)
    status = "FINISHED"
    try:
        stop.install()
        echo(f"sweep '{sweep.spec.name}': {len(sweep.distinct)} trials to run ({len(sweep.aliases)} aliases), "
             f"{sweep.spec.resources.max_concurrent_trials} at a time; folder {d}")
        echo(f"Ray's own messages: {send_ray_logs_to(d / 'ray.log')}; each trial's log: {d / 'trials' / 'NAME' / 'train.log'}")
        ensure_ray(log_to_driver=False)
        stop.install()  # again: ray.init sets a SIGTERM handler of its own (sys.exit)
        from ray import tune
        trainable = tune.with_resources(tune.with_parameters(run_one_trial, info=info), {"cpu": 0.5})
        tune_dir = d / "tune"
        callbacks = [_results_writer(d), live(console)]  # (on --resume, Tune calls the ones it saved)
        if resume and tune.Tuner.can_restore(str(tune_dir / "sweep")):
            tuner = tune.Tuner.restore(str(tune_dir / "sweep"), trainable, resume_unfinished=True, resume_errored=True)
        else:
            space, algo, num_samples = _search(sweep)
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(search_alg=algo, scheduler=_scheduler(sweep), num_samples=num_samples,
                                            max_concurrent_trials=sweep.spec.resources.max_concurrent_trials,
                                            reuse_actors=REUSE_TRIAL_PROCESSES,
                                            trial_name_creator=lambda t: f"trial_{t.trial_id}",
                                            trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
                run_config=_run_config(sweep, tune_dir, callbacks),
            )
        grid = tuner.fit()
        if grid.num_errors:
            status = "FAILED" if grid.num_errors == len(grid) else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        stop.stopping = True  # a second signal must not cut the bookkeeping short
        reason = {"KILLED": stop.reason, "FAILED": "sweep failed"}.get(status, "trial stopped early by the scheduler")
        mlflow_runs.close_open_children(uri, exp_id, parent_id, "KILLED" if status != "FAILED" else "FAILED", reason)
        write_results(d)
        if report and status != "KILLED":
            try:
                from conmim.report import make_report
                make_report(d)
            except Exception as e:  # noqa: BLE001 - the sweep's results are safe on disk either way
                echo(f"[report] could not write the report: {e}")
        mlflow_runs.end_run(uri, parent_id, status, reason if status == "KILLED" else None)
        stop.restore()
        for line in links:
            echo(line)
    return dict(Counter(str(row["status"]) for row in collect_rows(d)))
