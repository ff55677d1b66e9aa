"""Faults injected on purpose (``debug.*``), for the tests of recovery: a worker that exits, one
killed by SIGKILL, a loss that turns NaN. Each death happens once: a marker file in the output
folder survives the restart."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from conmim.config.experiment import ExperimentConfig


def poison(cfg: ExperimentConfig, step: int, loss):
    """``debug.nan_at_step``: the loss of that step becomes NaN."""
    return loss * float("nan") if cfg.debug.nan_at_step is not None and step == cfg.debug.nan_at_step else loss


def after_step(cfg: ExperimentConfig, out_dir: Path, rank: int, step: int) -> None:
    """``debug.crash_at_step`` (``os._exit``: a process death Ray cannot catch as an exception)
    and ``debug.kill_at_step`` (SIGKILL, as ``kill -9`` or the OOM killer)."""
    if step == cfg.debug.crash_at_step and not (out_dir / ".crash_injected").exists():
        _die(out_dir / ".crash_injected", f"worker {rank} died at step {step}", lambda: os._exit(13))
    if step == cfg.debug.kill_at_step and not (out_dir / ".kill_injected").exists():
        _die(out_dir / ".kill_injected", f"worker {rank} pid {os.getpid()} SIGKILLed at step {step}",
             lambda: os.kill(os.getpid(), signal.SIGKILL))


def _die(marker: Path, what: str, die) -> None:
    """It waits first for Ray Train's controller to register the checkpoint reported last (it does
    so when it next polls the workers): a worker dying a fraction of a second after reporting would
    restart from the checkpoint before. Real epochs last minutes; tiny test epochs a second."""
    deadline = time.monotonic() + REGISTER_WAIT_S
    while not _latest_checkpoint_registered() and time.monotonic() < deadline:
        time.sleep(0.2)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(what + "\n")
    die()


REGISTER_WAIT_S = 120


def _latest_checkpoint_registered() -> bool:
    """True where there is nothing to wait for (no Ray Train, storage that is not a local folder)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context
        storage = get_train_context().get_storage()
        run = Path(storage.experiment_fs_path)
        snapshot = Path(storage.checkpoint_manager_snapshot_path)
    except Exception:  # noqa: BLE001 - not inside a Ray Train worker
        return True
    return not run.is_dir() or checkpoint_registered(run, snapshot)


def checkpoint_registered(run: Path, snapshot: Path) -> bool:
    """The newest checkpoint folder of a Train run's storage is named in the controller's checkpoint
    manager snapshot (it writes the snapshot when it registers a checkpoint; ~2 s after a report)."""
    # named by time stamp: the last is the newest (folders only: the snapshot file is checkpoint_manager_...)
    names = sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())
    try:
        return not names or names[-1] in snapshot.read_text()
    except OSError:
        return False
