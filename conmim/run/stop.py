"""Stopping a sweep: SIGINT (Ctrl-C) and SIGTERM (``ray job stop``, which sends SIGKILL a grace
period later) raise :class:`SweepStopped` in the driver, so one code path ends the trials' runs
and the parent run as KILLED. A marker file in the sweep folder tells trials still running that
the sweep is going down, and why."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

STOP_MARKER = ".stopping"


class SweepStopped(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the sweep's driver; ``signame`` says which."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


def stop_reason(signame: Optional[str]) -> str:
    """The reason a stopped sweep's runs carry (``conmim.failure_reason``), the same wherever it is written."""
    if signame == "SIGTERM":
        return "sweep stopped (SIGTERM, e.g. ray job stop)"
    if signame and signame != "SIGINT":
        return f"sweep stopped ({signame})"
    return "sweep interrupted (Ctrl-C, SIGINT)"


def stopping(sweep_dir: Path) -> Optional[str]:
    """The stop reason if the sweep is going down, else None."""
    try:
        return stop_reason((Path(sweep_dir) / STOP_MARKER).read_text().strip())
    except OSError:
        return None


class SignalStop:
    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, sweep_dir: Path, on_stop=None):
        """``on_stop(reason)`` runs in the handler, before anything is torn down: `ray job stop`
        SIGKILLs the driver a grace period after SIGTERM, and Tune's own clean-up of the trials
        can take longer than that; the bookkeeping that must survive goes first."""
        self.marker, self.signame, self.stopping, self.saved = Path(sweep_dir) / STOP_MARKER, None, False, {}
        self.on_stop = on_stop
        self.marker.unlink(missing_ok=True)

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

    @property
    def reason(self) -> str:
        return stop_reason(self.signame)

    def _handle(self, signum, frame):
        import signal
        name = signal.Signals(signum).name
        if self.stopping:
            print(f"[conmim] {name}: already stopping, ending the MLflow runs", flush=True)
            return
        self.stopping, self.signame = True, name
        print(f"[conmim] {name}: stopping the sweep; its trials' MLflow runs end as KILLED", flush=True)
        try:
            # whole or not at all: a trial that reads a half-written marker would record a reason
            # without the signal's name
            tmp = self.marker.with_name(f"{STOP_MARKER}.{os.getpid()}.tmp")
            tmp.write_text(name)
            os.replace(tmp, self.marker)
        except OSError:
            pass
        if self.on_stop is not None:
            try:
                self.on_stop(self.reason)
            except Exception as e:  # noqa: BLE001 - the sweep's finally block tries again
                print(f"[conmim] could not end the runs yet ({type(e).__name__}: {e}); trying again on the way out")
        raise SweepStopped(name)
