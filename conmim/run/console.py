"""What a person watching ``conmim sweep`` sees: one line per trial event (variant, seed, phase,
epoch, loss, top-1), a progress bar over the trials with an ETA after each one ends, and where
things are (Ray's own messages go to a file, the MLflow pages to open). Ray Tune's status tables
and Ray Train's internal lines stay out of it."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ray.tune import Callback

from conmim.config.expand import Sweep
from conmim.metrics import FINAL_METRICS

BAR = 24


def send_ray_logs_to(path: Path) -> Path:
    """Ray's and Tune's driver-side log messages go to ``path`` instead of the console. (Worker
    output stays with Ray, in its session's logs folder, ``/tmp/ray/session_latest/logs`` for a
    local Ray; each trial also writes its own ``train.log``.)"""
    def to_console(h):
        return isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)

    root = logging.getLogger("ray")
    for h in list(root.handlers):  # the console's handlers, and an earlier sweep's file in this process
        if to_console(h) or getattr(h, "conmim_sweep_log", False):
            root.removeHandler(h)
    for name in ("ray.tune", "ray.train", "ray.data"):  # children log through "ray" only
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if to_console(h)]:
            lg.removeHandler(h)
        lg.propagate = True
    handler = logging.FileHandler(path)
    handler.conmim_sweep_log = True
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.propagate = False
    _raylet_messages_to_log()
    return path


def _raylet_messages_to_log() -> None:
    """The raylet's and GCS's messages to the driver (e.g. the WARNING that N worker processes
    were started, 'x the maximum expected startup concurrency', which fractional-CPU trials set
    off) are printed by a thread of ``ray.init`` straight to stdout, as ``(raylet) ...``, not
    through logging, and ``log_to_driver=False`` does not stop them. Ray has no switch for it: its
    printer, looked up by name at each message, is wrapped so that these lines go to the "ray"
    logger (ray.log); worker output keeps its own path."""
    import ray._private.worker as ray_worker
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "conmim_wrapped", False):
        return

    def to_log(data, *a, **kw):
        if data.get("pid") == "raylet":
            for line in data.get("lines", []):
                logging.getLogger("ray").warning("(raylet) %s", line)
            return
        return printer(data, *a, **kw)

    to_log.conmim_wrapped = True
    ray_worker.print_to_stdstream = to_log


def mlflow_links(uri: str, exp_id: str, parent_id: str, sweep_dir: Path) -> list[str]:
    """Where to look in MLflow once the sweep ends. A server's pages are opened directly; a SQLite
    store through ``conmim ui SWEEP_DIR``, which opens the store recorded in the sweep's folder
    (whatever --set, the file or the default chose), so the links' ids exist there."""
    from conmim.tracking.client import ui_links
    from conmim.tracking.stores import ui_command
    if uri.startswith(("http://", "https://")):
        return ["MLflow:"] + [f"  {label}: {url}" for label, url in ui_links(uri, exp_id, parent_id)]
    return [f"next: {ui_command(sweep_dir)}   (the MLflow UI on this sweep's store, then open:)"] + \
        [f"  {label}: {url}" for label, url in ui_links("http://127.0.0.1:5000", exp_id, parent_id)]


def _pct(x) -> str:
    return "–" if x is None or x != x else f"{100 * x:.2f}"


class SweepConsole:
    """Prints the sweep's events through ``echo``; Tune reaches it through :class:`ConsoleEvents`."""

    def __init__(self, sweep: Sweep, echo=print):
        self.echo, self.t0 = echo, time.time()
        self.total = len(sweep.distinct) if sweep.spec.search == "grid" else sweep.spec.optuna.num_samples
        self.epochs = {t.name: (t.config.pretrain.epochs if t.config.pretrain.enabled else 0, t.config.finetune.epochs)
                       for t in sweep.distinct}
        self.labels = {t.name: f"{t.variant} seed {t.seed}" for t in sweep.distinct}
        # trial -> "done"/"failed"; a resumed sweep starts with what earlier runs finished
        trials = sweep.dir / "trials"
        self.ended = {t.name: "done" for t in sweep.distinct if (trials / t.name / "result.json").exists()}
        self.initial = len(self.ended)
        self.running: set = set()
        self.width = max([len(v) for v in self.labels.values()] + [16])

    def _name(self, trial) -> str:
        return trial.config.get("trial") or f"optuna_{trial.trial_id}"

    def _line(self, trial, what: str) -> None:
        name = self._name(trial)
        self.echo(f"{time.strftime('%H:%M:%S')}  {self.labels.get(name, name):<{self.width}}  {what}")

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._line(trial, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("status") == "finished":
            return  # the final report: said by on_trial_complete
        phase = result.get("phase")
        if phase not in ("pretrain", "finetune"):
            return
        pre, ft = self.epochs.get(self._name(trial), (None, None))
        total = pre if phase == "pretrain" else ft
        loss = result.get("pretrain_loss" if phase == "pretrain" else "finetune_loss")
        extra = f"  k-NN(val) {_pct(result['knn_proxy_top1'])}" if "knn_proxy_top1" in result else ""
        self._line(trial, f"{phase:<8}  epoch {result.get('epoch')}/{total or '?'}  loss {loss:.4f}{extra}"
                   if isinstance(loss, float) else f"{phase} epoch {result.get('epoch')}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        r = trial.last_result or {}
        if r.get("status") == "failed":
            self.ended[self._name(trial)] = "failed"
            self._line(trial, "FAILED (reason: trials/NAME/failed.json and the MLflow run's conmim.failure_reason)")
        else:
            self.ended[self._name(trial)] = "done"
            m = {k: r.get(k) for k in FINAL_METRICS}
            self._line(trial, f"done      top-1 {_pct(m['finetune_top1'])} %  (val {_pct(m['finetune_val_top1'])}, "
                              f"k-NN {_pct(m['knn_top1'])}, probe {_pct(m['linear_probe_top1'])})")
        self._progress()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.ended[self._name(trial)] = "failed"
        self._line(trial, "ERROR (see trials/NAME/failed.json)")
        self._progress()

    def _progress(self) -> None:
        ended = len(self.ended)
        failed = sum(v == "failed" for v in self.ended.values())
        frac = ended / max(self.total, 1)
        elapsed = time.time() - self.t0
        now = ended - self.initial  # the pace of this run, not of the one it resumes
        eta = elapsed / now * (self.total - ended) if now else float("nan")
        bar = "#" * round(BAR * frac) + "." * (BAR - round(BAR * frac))
        eta_s = "–" if eta != eta else (f"{eta / 60:.0f} min" if eta >= 90 else f"{eta:.0f} s")
        self.echo(f"[{bar}] {ended}/{self.total} trials ({failed} failed), {len(self.running)} running, "
                  f"{elapsed / 60:.1f} min so far, ETA {eta_s}")


_LIVE: list = []  # the console of the sweep this process runs


def live(console: SweepConsole) -> "ConsoleEvents":
    """Make ``console`` the one Tune's events reach; returns the callback to give Tune."""
    _LIVE[:] = [console]
    return ConsoleEvents()


class ConsoleEvents(Callback):
    """The Tune callback of the console: stateless, it forwards to this process's live console.
    Tune pickles its callbacks into the experiment's state and, on ``--resume``, calls the
    unpickled ones: a stateful console would come back with the interrupted run's counts (and
    its output function, which may not even pickle)."""

    def _call(self, name, *a, **kw):
        if _LIVE:
            getattr(_LIVE[0], name)(*a, **kw)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._call("on_trial_start", iteration, trials, trial, **info)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._call("on_trial_result", iteration, trials, trial, result, **info)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._call("on_trial_complete", iteration, trials, trial, **info)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._call("on_trial_error", iteration, trials, trial, **info)
