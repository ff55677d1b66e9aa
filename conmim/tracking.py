"""MLflow bookkeeping: one parent run per sweep, exactly one child run per distinct trial.

Runs are found again by tags (never by an in-memory map), so a resumed sweep continues the runs
it already has instead of creating second ones."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

TRIAL_TAG = "conmim.trial"
SWEEP_TAG = "conmim.sweep"
ROLE_TAG = "conmim.role"
REASON_TAG = "conmim.failure_reason"
SECRET_KEY = re.compile(r"(passw(or)?d|secret|token|api_?key|access_?key|private_?key|credential|auth|session_?key|"
                        r"signature|(^|[._-])sig($|[._-])|(^|[._-])key$)", re.I)
MASK = "***"


class TrackingUnavailable(RuntimeError):
    pass


def client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def retry(fn, *a, tries: int = 8, **kw):
    """SQLite stores report 'database is locked' under concurrent writers; servers blip."""
    for i in range(tries):
        try:
            return fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - MLflow raises several types for the same blip
            msg = str(e).lower()
            if i == tries - 1 or not ("locked" in msg or "connection" in msg or "timed out" in msg or "503" in msg):
                raise
            time.sleep(0.2 * 2 ** i)


def check_reachable(uri: str) -> None:
    """Fail fast (before Ray starts) when the tracking store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        import urllib.request
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except Exception as e:  # noqa: BLE001
            raise TrackingUnavailable(f"mlflow.tracking_uri: the MLflow server at {redact_uri(uri)} is not reachable "
                                      f"({e}); start it (cluster/mlflow-server.sh) or fix the URI.") from None
    elif (db := sqlite_file(uri)) is not None:
        parent = db.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            why = "not a folder" if parent.exists() else "no such folder"
            raise TrackingUnavailable(f"mlflow.tracking_uri: cannot write the SQLite store in {parent} "
                                      f"({why if not parent.is_dir() else 'not writable'}).")
    try:
        retry(client(uri).search_experiments, max_results=1, tries=2)
    except Exception as e:  # noqa: BLE001
        login = (" It asks for a login (MLflow basic auth): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."
                 if re.search(r"\b401\b", str(e)) else "")
        raise TrackingUnavailable(f"mlflow.tracking_uri: {redact_uri(uri)} does not answer as an MLflow store ({e}).{login}") from None


def redact_uri(uri: str) -> str:
    """``scheme://user:password@host/...?token=...`` -> ``scheme://user:***@host/...?token=***``."""
    uri = re.sub(r"(//[^/@:\s]+):([^/@\s]+)@", rf"\1:{MASK}@", uri)      # user:password@
    uri = re.sub(r"//([^/@:\s]{16,})@", rf"//{MASK}@", uri)                # a bare token as user name
    return re.sub(r"([?&;][^=&;#\s]+)=([^&;#\s]*)",
                  lambda m: f"{m.group(1)}={MASK}" if SECRET_KEY.search(m.group(1).lstrip("?&;")) else m.group(0), uri)


def _secret_env_values() -> list[str]:
    """Values of environment variables whose names look secret (MLFLOW_TRACKING_TOKEN, AWS_SECRET_ACCESS_KEY,
    MLFLOW_TRACKING_PASSWORD, ...): a config value that contains one is masked."""
    return sorted((v for k, v in environ_copy().items() if SECRET_KEY.search(k) and len(v) >= 6), key=len, reverse=True)


def environ_copy() -> dict[str, str]:
    """A copy of os.environ. MLflow's telemetry thread sets and unsets a variable of its own
    (_MLFLOW_TELEMETRY_SESSION_ID) at any time; ``dict(os.environ)`` reads each listed name
    again and raised KeyError for one that vanished meanwhile, failing whole trials. Listing the
    names is atomic, and ``get`` skips a name that is gone."""
    return {k: v for k in list(os.environ) if (v := os.environ.get(k)) is not None}


def redact_text(s: str) -> str:
    for secret in _secret_env_values():
        s = s.replace(secret, MASK)
    return redact_uri(s) if "://" in s or "?" in s else s


def redact_value(key: str, value: Any) -> Any:
    """One config value as it may be shown to MLflow: masked when its key or content looks secret."""
    if isinstance(value, dict):
        return {k: redact_value(f"{key}.{k}" if key else k, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(key, v) for v in value]
    if key and SECRET_KEY.search(key.rsplit(".", 1)[-1]) and value not in (None, "", False):
        return MASK
    return redact_text(value) if isinstance(value, str) else value


def redact_params(flat: dict[str, Any]) -> dict[str, str]:
    """Config values as MLflow params; anything that looks like a credential is masked."""
    out = {}
    for k, v in flat.items():
        v = redact_value(k, v)
        s = "" if v is None else str(v)
        out[k] = redact_text(s)[:6000]
    return out


def redact_tags(tags: dict[str, str]) -> dict[str, str]:
    return {k: (MASK if SECRET_KEY.search(k.rsplit(".", 1)[-1]) else redact_text(str(v))) for k, v in tags.items()}


def log_config(uri: str, run_id: str, config: dict, path: Path) -> None:
    """Write ``config`` (credentials masked) as YAML to ``path`` and log it as the run's artifact."""
    import yaml
    path.write_text(yaml.safe_dump(redact_value("", config), sort_keys=False))
    retry(client(uri).log_artifact, run_id, str(path))


def git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                               timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = retry(c.get_experiment_by_name, name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            retry(c.restore_experiment, exp.experiment_id)
        return exp.experiment_id
    try:
        return retry(c.create_experiment, name, artifact_location=artifact_location(uri))
    except Exception:  # noqa: BLE001 - created concurrently
        return retry(c.get_experiment_by_name, name).experiment_id


def artifact_location(uri: str) -> Optional[str]:
    """A SQLite store keeps its artifacts beside the database file, so that the sweep's MLflow is
    one folder to keep or delete (MLflow's own default is ./mlruns of whatever folder the
    experiment happened to be created from). Servers and other stores decide for themselves."""
    db = sqlite_file(uri)
    return (db.resolve().parent / "mlruns").as_uri() if db is not None else None


def sqlite_file(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` tracking URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def find_runs(uri: str, exp_id: str, filter_string: str) -> list:
    return retry(client(uri).search_runs, [exp_id], filter_string=filter_string, max_results=10000)


def parent_run(uri: str, exp_id: str, sweep_name: str, run_id: Optional[str]) -> str:
    c = client(uri)
    if run_id:
        run = retry(c.get_run, run_id)
        if run.info.status != "RUNNING":
            retry(c.update_run, run_id, status="RUNNING")
        if REASON_TAG in run.data.tags:  # resumed: why it stopped last time no longer describes it
            retry(c.delete_tag, run_id, REASON_TAG)
        return run_id
    run = retry(c.create_run, exp_id, run_name=sweep_name, tags={ROLE_TAG: "sweep", SWEEP_TAG: sweep_name,
                                                                 **({"conmim.git_commit": git_commit()} if git_commit() else {})})
    return run.info.run_id


def child_run(uri: str, exp_id: str, parent_id: str, trial_name: str, tags: dict[str, str]):
    """The one run of this trial under this parent: found by tag, or created."""
    c = client(uri)
    found = find_runs(uri, exp_id, f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial_name}'")
    if found:
        run = found[0]
        if run.info.status != "RUNNING" and run.info.status != "FINISHED":
            retry(c.update_run, run.info.run_id, status="RUNNING")
            if REASON_TAG in run.data.tags:  # trained again: the old reason would mislabel the new run
                retry(c.delete_tag, run.info.run_id, REASON_TAG)
        for k, v in redact_tags(tags).items():
            retry(c.set_tag, run.info.run_id, k, v)
        return run
    return retry(c.create_run, exp_id, run_name=trial_name,
                 tags={"mlflow.parentRunId": parent_id, TRIAL_TAG: trial_name, ROLE_TAG: "trial", **redact_tags(tags)})


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log ``params`` (credentials masked here, so callers pass the plain config) not yet on the run."""
    from mlflow.entities import Param
    c = client(uri)
    existing = retry(c.get_run, run_id).data.params
    items = [Param(k, v) for k, v in redact_params(params).items() if k not in existing]
    for i in range(0, len(items), 100):
        retry(c.log_batch, run_id, params=items[i: i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, Any], step: int = 0, ts: Optional[int] = None,
                tries: int = 8) -> None:
    from mlflow.entities import Metric
    ts = int(time.time() * 1000) if ts is None else ts
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
    for i in range(0, len(items), 500):
        retry(client(uri).log_batch, run_id, metrics=items[i: i + 500], tries=tries)


def end_run(uri: str, run_id: str, status: str, reason: Optional[str] = None) -> None:
    c = client(uri)
    if reason:
        retry(c.set_tag, run_id, REASON_TAG, redact_text(reason)[:5000])
    retry(c.set_terminated, run_id, status=status)


def close_open_children(uri: str, exp_id: str, parent_id: str, status: str, reason: str) -> int:
    """At sweep exit: no child run may stay RUNNING."""
    n = 0
    for run in find_runs(uri, exp_id, f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'RUNNING'"):
        end_run(uri, run.info.run_id, status, reason)
        n += 1
    return n


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


class EpochLogger:
    """A Ray Train callback: every report of rank 0 goes to the trial's MLflow run as it happens
    (buffered in ``pending`` while the server is down, sent when it answers again)."""

    def __new__(cls, uri: str, run_id: str, pending: Optional[Path] = None):
        from ray.train import UserCallback

        class _Logger(UserCallback):
            def __init__(self):
                self.uri, self.run_id, self.pending = uri, run_id, pending

            def after_report(self, run_context, metrics, checkpoint):
                m = dict(metrics[0])
                phase = m.pop("phase", "pretrain")
                step = int(m.pop("epoch", 0))
                m.pop("step", None)
                if phase == "finetune":
                    m = {k if k.startswith("finetune") else f"finetune_{k}": v for k, v in m.items()}
                if self.pending is not None:
                    log_metrics_buffered(self.uri, self.run_id, m, step, self.pending)
                    return
                try:
                    log_metrics(self.uri, self.run_id, m, step)
                except Exception as e:  # noqa: BLE001 - never kill training over a metric
                    print(f"[mlflow] could not log epoch {step} metrics: {e}", flush=True)

        return _Logger()
