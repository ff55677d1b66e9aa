"""A trial on Ray Train: one ``TorchTrainer`` run over ``resources.num_workers`` workers (gloo on
CPU, NCCL on GPU), checkpointed through ``ray.train.report`` and restarted from the latest
checkpoint when a worker dies (``resources.max_failures`` times).

Every worker runs :func:`_worker`, whose task is the whole trial (pre-train, probes, fine-tune:
one worker-group start instead of two), or one phase (``conmim pretrain`` / ``conmim finetune``).
A failure comes back as a :class:`~conmim.failures.TrialFailure`, never as text to parse.

Runs are named deterministically from the output folder, so re-running the same command after
a crash finds the Train run's checkpoints and continues (Ray Train V2 restores a run by name)."""
from __future__ import annotations

import functools
import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Optional

from conmim.config.experiment import ExperimentConfig
from conmim.failures import DivergedError, TrialFailure, read_worker_failure, record_worker_failure
from conmim.trial import TrialResult

RAY_DEFAULT_ENV = {"RAY_TRAIN_V2_ENABLED": "1"}
# For a Ray that ensure_ray starts on this machine, inherited by all its processes: no preemption
# watcher (a helper actor per Train run, a Python process importing Ray Train, ~2 s of a core on
# a laptop), which guards against what cannot happen on one machine: a preempted cloud node.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# No Ray Data actor for a run without Ray Datasets (_without_dataset_manager); False: Ray's default.
SKIP_UNUSED_DATASET_MANAGER = True


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, log_to_driver: bool = True) -> None:
    """Join ``address``, or start a local Ray sized for this machine (loopback only).

    Inside a Ray job (``conmim sweep --address``) Ray sets ``RAY_ADDRESS`` for the driver: the
    job's sweep joins that cluster instead of starting a Ray of its own. ``log_to_driver=False``
    (a sweep, which has a console of its own): the workers' output stays in Ray's logs and in
    each trial's ``train.log``."""
    import ray
    if ray.is_initialized():
        return
    for k, v in RAY_DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return
    for k, v in LOCAL_RAY_ENV.items():
        os.environ.setdefault(k, v)
    # A trial's function plus its Train workers need more logical CPUs than a 2-core laptop has;
    # they time-share the cores, which is what the user asked for by running here.
    kwargs = dict(num_cpus=num_cpus or max(4, os.cpu_count() or 1), object_store_memory=200 * 1024 ** 2,
                  include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=log_to_driver,
                  runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    try:
        ray.init(**kwargs)
    except Exception as e:
        # Ray gives its raylet a fixed 30 s to register with the GCS (ray/_private/node.py, not
        # configurable); on a loaded 2-core machine a start can miss it. Start once more from clean.
        if "timed out during startup" not in str(e):
            raise
        ray.shutdown()
        ray.init(**kwargs)


def _run_trial(cfg: ExperimentConfig, session, config: dict) -> TrialResult:
    import ray
    from conmim.trial import run_phases
    result = run_phases(cfg, session, session)
    # where rank 0 ran (the last attempt's node when a restart moved it): results.parquet and a tag
    result.node_id = ray.get_runtime_context().get_node_id()
    return result


def _run_pretrain(cfg: ExperimentConfig, session, config: dict) -> dict:
    from conmim.train.pretrain import pretrain
    res = pretrain(cfg, session)
    res.pop("net")
    return res


def _run_finetune(cfg: ExperimentConfig, session, config: dict) -> dict:
    from conmim.train import checkpoint
    from conmim.train.finetune import finetune
    with config["checkpoint"].as_directory() as d:
        weights = checkpoint.encoder_weights(Path(d), cfg.finetune.encoder)
    return finetune(cfg, session, weights)


TASKS = {"trial": _run_trial, "pretrain": _run_pretrain, "finetune": _run_finetune}


def _worker(config: dict):
    """Every Ray Train worker: one task of one experiment."""
    from conmim.train.session import RaySession, set_threads, undo_ray_nice
    cfg = ExperimentConfig.model_validate(config["experiment"])
    undo_ray_nice()
    set_threads(cfg.resources.threads)
    task = config["task"]
    try:
        return TASKS[task](cfg, RaySession(config["out"]), config)
    except DivergedError as e:  # deterministic: returned, not raised, so Ray does not retry it
        return TrialFailure.of(e, task)
    except Exception as e:
        # for the driver, which gets Ray's wrapping of it; Ray retries the worker group meanwhile
        record_worker_failure(Path(config["out"]), e, task, config["attempt"])
        raise


def run_name(out: Path, task: str) -> str:
    return f"{task}-{hashlib.sha1(str(out).encode()).hexdigest()[:10]}"


@functools.cache  # one subclass per trainer class, not one per trial
def _without_dataset_manager(trainer_cls):
    """``trainer_cls`` without Ray Data's part when no Ray Dataset is passed (conmim's never are:
    each worker reads its own shard). Ray Train 2.60 starts a ``DatasetManager`` actor per run
    regardless, a Python process importing Ray Data: 3.4 s of a core for nothing, once per trial
    (benchmarks/train_run_overhead.py). The hook is Ray's private ``_create_default_callbacks``
    (ray is pinned to 2.60.*): tests/test_tune_settings.py compares the callbacks with Ray's own
    list, tests/test_distributed.py checks that no ``DatasetManager`` starts."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    class Trainer(trainer_cls):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if not SKIP_UNUSED_DATASET_MANAGER or self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    Trainer.__name__ = Trainer.__qualname__ = trainer_cls.__name__
    return Trainer


def _trainer(cfg: ExperimentConfig, out: Path, task: str, storage: Optional[str], extra: dict | None = None,
             callbacks: list | None = None):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    r = cfg.resources
    per_worker = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        per_worker["GPU"] = r.gpus_per_worker
    return _without_dataset_manager(TorchTrainer)(
        _worker,
        train_loop_config={"experiment": cfg.to_dict(), "out": str(out), "task": task, "attempt": uuid.uuid4().hex,
                           **(extra or {})},
        scaling_config=ray.train.ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                               resources_per_worker=per_worker),
        # (no rank waits in a collective longer than this: a stuck peer fails the trial, which restarts)
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo", timeout_s=r.collective_timeout_s),
        run_config=ray.train.RunConfig(
            name=run_name(out, task), storage_path=storage or str(out / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
        ),
    )


class TrialRunFailed(RuntimeError):
    def __init__(self, failure: TrialFailure):
        super().__init__(failure.reason)
        self.failure = failure


def _fit(trainer, out: Path):
    """``trainer.fit()``; a failure raises :class:`TrialRunFailed` with what the worker recorded,
    or, when no worker could record anything (killed), what Ray says of the worker group."""
    from ray.train import TrainingFailedError
    attempt = trainer.train_loop_config["attempt"]
    try:
        result = trainer.fit()
        error = result.error
    except TrainingFailedError as e:
        result, error = None, e
    if error is not None:
        failure = read_worker_failure(out, attempt)
        if failure is None:
            text = str(error).strip()
            failure = TrialFailure("worker_died", type(error).__name__, text.splitlines()[-1] if text else "")
        raise TrialRunFailed(failure) from error
    if isinstance(result.return_value, TrialFailure):
        raise TrialRunFailed(result.return_value)
    return result


def run_trial(cfg: ExperimentConfig, out: Path, storage: Optional[str] = None, callbacks=None,
              warnings: Optional[list] = None) -> TrialResult:
    """Pre-train, probe and fine-tune in one Ray Train run; writes ``out/result.json`` once, with
    the data pre-flight's ``warnings``."""
    t0 = time.time()
    result = _fit(_trainer(cfg, out, "trial", storage, callbacks=callbacks), out).return_value
    result.timings["wall_seconds"] = time.time() - t0
    result.warnings = list(warnings or [])
    result.write(out)
    return result


def run_on_ray(cfg: ExperimentConfig, out: Path, address: Optional[str] = None,
               warnings: Optional[list] = None) -> TrialResult:
    ensure_ray(address)
    return run_trial(cfg, out, warnings=warnings)


def pretrain_phase(cfg: ExperimentConfig, out: Path, storage: Optional[str] = None):
    """Pre-training alone on Ray Train: (its summary, its last checkpoint)."""
    result = _fit(_trainer(cfg, out, "pretrain", storage), out)
    return result.return_value, result.checkpoint


def pretrain_on_ray(cfg: ExperimentConfig, out: Path, address: Optional[str] = None):
    ensure_ray(address)
    pre, ckpt = pretrain_phase(cfg, out)
    return ckpt.path, pre["final_pretrain_loss"]


def finetune_on_ray(cfg: ExperimentConfig, checkpoint: Path, out: Path, address: Optional[str] = None) -> dict:
    import ray.train
    ensure_ray(address)
    ckpt = ray.train.Checkpoint.from_directory(str(checkpoint))
    ft = _fit(_trainer(cfg, out, "finetune", None, {"checkpoint": ckpt}), out).return_value
    return {k: v for k, v in ft.items() if k != "finetune_history"}
