"""How a trial fails, as data that crosses processes (Ray Train worker -> Tune trial -> sweep)
without parsing exception text. Torch-free, like the Tune trial's process."""
from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

FAILURE_FILE = "worker-failure.json"  # in the trial's folder: the last exception a worker raised


class DivergedError(RuntimeError):
    """The loss became NaN/inf: the trial failed, deterministically, for a reason worth recording."""


@dataclass(frozen=True)
class TrialFailure:
    """Why a trial failed. ``kind``: ``"diverged"`` (deterministic: not retried), ``"error"`` (an
    exception in the training code), ``"worker_died"`` (a worker process was lost and the
    restarts ran out)."""
    kind: str
    error_type: str
    message: str
    phase: str = ""

    @property
    def reason(self) -> str:
        return f"{self.error_type}: {self.message}" if self.message else self.error_type

    @classmethod
    def of(cls, e: BaseException, phase: str = "") -> "TrialFailure":
        kind = "diverged" if isinstance(e, DivergedError) else "error"
        return cls(kind, type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "", phase)


def record_worker_failure(out: Path, e: BaseException, phase: str, attempt: str) -> None:
    """Called in a worker as an exception leaves it: the driver reads the failure from here rather
    than from Ray's wrapping of it (a traceback text). ``attempt``: the id of the ``fit()`` it
    belongs to, so that an earlier run's record is never taken for this one's."""
    rec = {**asdict(TrialFailure.of(e, phase)), "traceback": traceback.format_exc(), "time": time.time(),
           "attempt": attempt}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{FAILURE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(rec, indent=2))
    os.replace(tmp, out / FAILURE_FILE)


def read_worker_failure(out: Path, attempt: str) -> Optional[TrialFailure]:
    """The failure a worker of ``attempt`` recorded, if any."""
    try:
        rec = json.loads((Path(out) / FAILURE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if rec.get("attempt") != attempt:
        return None
    return TrialFailure(rec["kind"], rec["error_type"], rec["message"], rec.get("phase", ""))
