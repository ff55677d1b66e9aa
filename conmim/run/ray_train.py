"""The trial on Ray Train: pre-training, then fine-tuning, each a ``TorchTrainer`` over
``resources.num_workers`` workers (gloo on CPU, NCCL on GPU), checkpointed through
``ray.train.report`` and restarted from the latest checkpoint when a worker dies.

Runs are named deterministically from the output folder, so re-running the same command after
a crash finds the Train run's checkpoints and continues (Ray Train V2 restores a run by name)."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Optional

from conmim.config import ExperimentConfig

RAY_DEFAULT_ENV = {"RAY_TRAIN_V2_ENABLED": "1"}
# For a Ray that ensure_ray starts on this machine, inherited by all its processes. The helper
# actors these switch off each cost a Python process importing Ray Train (~2 s of a core on a
# laptop) per Train run, and guard against what cannot happen here: a preempted cloud node, a
# controller that dies while the cluster lives on (a local Ray dies with its driver).
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "CONMIM_LOCAL_RAY": "1"}


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Join ``address``, or start a local Ray sized for this machine (loopback only).

    Inside a Ray job (``conmim sweep --address``) Ray sets ``RAY_ADDRESS`` for the driver: the
    job's sweep joins that cluster instead of starting a Ray of its own."""
    import ray
    if ray.is_initialized():
        return
    for k, v in RAY_DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    for k, v in LOCAL_RAY_ENV.items():
        os.environ.setdefault(k, v)
    # A trial's function plus its Train workers need more logical CPUs than a 2-core laptop has;
    # they time-share the cores, which is what the user asked for by running here.
    ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), object_store_memory=200 * 1024 ** 2,
             include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})


def _threads(cfg: ExperimentConfig) -> int:
    return cfg.resources.threads_per_worker or max(1, int(cfg.resources.cpus_per_worker))


def _pretrain_worker(config: dict):
    from conmim.pretrain import pretrain
    from conmim.session import RaySession, set_threads
    from conmim.pretrain import DivergedError
    cfg = ExperimentConfig.model_validate(config["experiment"])
    set_threads(_threads(cfg))
    try:
        res = pretrain(cfg, RaySession(config["out"]))
    except DivergedError as e:  # deterministic: returned, not raised, so Ray does not retry it
        return {"diverged": str(e)}
    res.pop("net")
    return res


def _trial_worker(config: dict):
    """The whole trial in one Train run: one worker-group start instead of two."""
    from conmim.pretrain import DivergedError
    from conmim.session import RaySession, set_threads
    from conmim.trial import result_of, trial_phases
    cfg = ExperimentConfig.model_validate(config["experiment"])
    set_threads(_threads(cfg))
    session = RaySession(config["out"])
    try:
        carry, ft = trial_phases(cfg, session, session)
    except DivergedError as e:  # deterministic: returned, not raised, so Ray does not retry it
        return {"diverged": str(e)}
    import ray
    # The result record is made here, where torch, the model and the data are loaded anyway: the
    # process that called fit() (a Tune trial, one per trial) then never imports them (~6 s of a
    # core and ~250 MB per trial on a laptop); it adds the wall time around fit(). node_id: where
    # rank 0 ran (the last attempt's node when a restart moved it), for results.parquet and a tag.
    return {"result": result_of(cfg, carry, ft, wall=float("nan")), "node_id": ray.get_runtime_context().get_node_id()}


def _finetune_worker(config: dict):
    """Fine-tuning alone, from a pre-training checkpoint (``conmim finetune --checkpoint``)."""
    from conmim.finetune import finetune
    from conmim.pretrain import DivergedError, load_encoder_state
    from conmim.session import RaySession, set_threads
    cfg = ExperimentConfig.model_validate(config["experiment"])
    set_threads(_threads(cfg))
    with config["checkpoint"].as_directory() as d:
        state = load_encoder_state(Path(d), cfg.finetune.encoder)
    try:
        return finetune(cfg, RaySession(config["out"]), state)
    except DivergedError as e:
        return {"diverged": str(e)}


def run_name(out: Path, phase: str) -> str:
    return f"{phase}-{hashlib.sha1(str(out).encode()).hexdigest()[:10]}"


def _trainer_class():
    """``TorchTrainer`` without the helper actors a local run does not need (see LOCAL_RAY_ENV).

    The datasets helper is skipped always (no Ray Datasets are passed; it would start an idle
    actor per run); the placement-group cleaner only on a local Ray."""
    from ray.train.torch import TorchTrainer
    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # another Ray version: the stock trainer, helpers and all
        return TorchTrainer
    skip = (DatasetsCallback,) + ((PlacementGroupCleanerCallback,) if os.environ.get("CONMIM_LOCAL_RAY") else ())

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, skip)]
    return LeanTorchTrainer


def _trainer(fn, cfg: ExperimentConfig, out: Path, phase: str, storage: Optional[str], extra: dict | None = None,
             callbacks: list | None = None):
    import ray.train
    from ray.train.torch import TorchConfig
    r = cfg.resources
    per_worker = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        per_worker["GPU"] = r.gpus_per_worker
    return _trainer_class()(
        fn,
        train_loop_config={"experiment": cfg.to_dict(), "out": str(out), **(extra or {})},
        scaling_config=ray.train.ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                               resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_name(out, phase), storage_path=storage or str(out / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.pretrain.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
        ),
    )


class TrainRunFailed(RuntimeError):
    pass


def _fit(trainer):
    from ray.train import TrainingFailedError
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        raise TrainRunFailed(_root_cause(e)) from e
    if result.error is not None:
        raise TrainRunFailed(_root_cause(result.error))
    if isinstance(result.return_value, dict) and "diverged" in result.return_value:
        raise TrainRunFailed(f"DivergedError: {result.return_value['diverged']}")
    return result


def _root_cause(e: BaseException) -> str:
    text = str(e)
    for marker in ("DivergedError:", "ValueError:", "RuntimeError:"):
        if marker in text:
            return text[text.rindex(marker):].strip().splitlines()[0]
    return text.strip().splitlines()[-1] if text.strip() else type(e).__name__


def pretrain_phase(cfg: ExperimentConfig, out: Path, storage: Optional[str] = None):
    result = _fit(_trainer(_pretrain_worker, cfg, out, "pretrain", storage))
    return result.return_value, result.checkpoint


def run_trial(cfg: ExperimentConfig, out: Path, storage: Optional[str] = None, callbacks=None) -> dict:
    """Pre-train, probe and fine-tune in one Ray Train run; writes ``out/result.json`` once."""
    from conmim.results import write_result
    t0 = time.time()
    ret = _fit(_trainer(_trial_worker, cfg, out, "trial", storage, callbacks=callbacks)).return_value
    result = {**ret["result"], "wall_seconds": time.time() - t0, "node_id": ret.get("node_id")}
    write_result(out, result)
    return result


def run_on_ray(cfg: ExperimentConfig, out: Path, address: Optional[str] = None) -> dict:
    ensure_ray(address)
    return run_trial(cfg, out)


def pretrain_on_ray(cfg: ExperimentConfig, out: Path, address: Optional[str] = None):
    ensure_ray(address)
    pre, ckpt = pretrain_phase(cfg, out)
    return ckpt.path, pre["final_pretrain_loss"]


def finetune_on_ray(cfg: ExperimentConfig, checkpoint: Path, out: Path, address: Optional[str] = None) -> dict:
    import ray.train
    ensure_ray(address)
    ckpt = ray.train.Checkpoint.from_directory(str(checkpoint))
    ft = _fit(_trainer(_finetune_worker, cfg, out, "finetune", None, {"checkpoint": ckpt})).return_value
    return {k: v for k, v in ft.items() if k not in ("finetune_history",)}
