"""While the MLflow server cannot be reached, a trial keeps training: its per-epoch metric points
wait in a JSON-lines file in the trial's folder and are sent when the server answers again."""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from conmim.tracking.client import TrackingUnavailable, log_metrics
from conmim.tracking.redact import redact_uri

PENDING_FILE = "mlflow-pending.jsonl"  # in the trial folder: metric points MLflow did not take yet


@contextlib.contextmanager
def fail_fast():
    """MLflow's HTTP client retries a refused connection for minutes (7 tries, backoff 2 s...120 s);
    while training, a report must not wait that long: one try, 10 s timeout, then buffer."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pending_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
    return out


def log_metrics_buffered(uri: str, run_id: str, metrics: dict[str, Any], step: int, pending: Path) -> bool:
    """Log metrics now, after any buffered earlier ones; if MLflow cannot be reached, append them to
    ``pending`` (a JSON line each) instead. Never raises for an unreachable server: training goes on,
    nothing is dropped. Returns True when everything, old and new, reached MLflow."""
    point = {"metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
             "step": step, "ts": int(time.time() * 1000)}
    queue = _pending_lines(pending) + [point]
    try:
        with fail_fast():
            for p in queue:
                log_metrics(uri, run_id, p["metrics"], p["step"], ts=p["ts"], tries=2)
    except Exception as e:  # noqa: BLE001 - any failure: keep the points on disk
        pending.parent.mkdir(parents=True, exist_ok=True)
        with pending.open("a") as f:
            f.write(json.dumps(point) + "\n")
        print(f"[mlflow] unreachable ({type(e).__name__}); {len(queue)} metric point(s) buffered in {pending}, "
              f"sent when it answers again", flush=True)
        return False
    pending.unlink(missing_ok=True)  # re-sending a point already logged is harmless: same key, step, value, time
    return True


def flush_pending(uri: str, run_id: str, pending: Path, wait_s: Optional[float] = None) -> int:
    """At the end of a trial: send the buffered metric points, waiting up to ``wait_s`` seconds
    (default ``$CONMIM_MLFLOW_WAIT`` or 600) for the server. Raises TrackingUnavailable, naming the
    file that keeps the points, when it does not come back in time."""
    lines = _pending_lines(pending)
    if not lines:
        return 0
    wait_s = float(os.environ.get("CONMIM_MLFLOW_WAIT", 600)) if wait_s is None else wait_s
    deadline = time.time() + wait_s
    while True:
        try:
            with fail_fast():
                for p in lines:
                    log_metrics(uri, run_id, p["metrics"], p["step"], ts=p["ts"], tries=1)
            pending.unlink(missing_ok=True)
            print(f"[mlflow] reachable again: {len(lines)} buffered metric point(s) sent", flush=True)
            return len(lines)
        except Exception as e:  # noqa: BLE001
            if time.time() >= deadline:
                raise TrackingUnavailable(
                    f"MLflow at {redact_uri(uri)} did not answer for {wait_s:.0f} s after the trial ended "
                    f"({type(e).__name__}); {len(lines)} metric point(s) are kept in {pending}") from None
            time.sleep(2)
