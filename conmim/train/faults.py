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
    """It waits first: Ray Train's controller registers a reported checkpoint when it next polls
    the workers, so a worker dying a fraction of a second after reporting restarts from the
    checkpoint before. Real epochs last minutes; tiny test epochs last a second."""
    time.sleep(5)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(what + "\n")
    die()
