"""MLflow bookkeeping: one parent run per sweep, exactly one child run per distinct trial.

Runs are found again by tags (never by an in-memory map), so a resumed sweep continues the runs
it already has instead of creating second ones."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

TRIAL_TAG = "conmim.trial"
SWEEP_TAG = "conmim.sweep"
ROLE_TAG = "conmim.role"
REASON_TAG = "conmim.failure_reason"
SECRET_KEY = re.compile(r"(password|secret|token|api_key|apikey|credential)", re.I)


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
    import os
    if uri.startswith(("http://", "https://")):
        import urllib.request
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except Exception as e:  # noqa: BLE001
            raise TrackingUnavailable(f"mlflow.tracking_uri: the MLflow server at {redact_uri(uri)} is not reachable "
                                      f"({e}); start it (cluster/mlflow-server.sh) or fix the URI.") from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///"):]).parent
        if not parent.exists() or not os.access(parent, os.W_OK):
            raise TrackingUnavailable(f"mlflow.tracking_uri: cannot write the SQLite store in {parent}.")
    try:
        retry(client(uri).search_experiments, max_results=1, tries=2)
    except Exception as e:  # noqa: BLE001
        raise TrackingUnavailable(f"mlflow.tracking_uri: {redact_uri(uri)} does not answer as an MLflow store ({e}).") from None


def redact_uri(uri: str) -> str:
    return re.sub(r"//([^/@:]+):([^/@]+)@", r"//\1:***@", uri)


def redact_params(flat: dict[str, Any]) -> dict[str, str]:
    """Config values as MLflow params; anything that looks like a credential is masked."""
    out = {}
    for k, v in flat.items():
        s = "" if v is None else str(v)
        if SECRET_KEY.search(k):
            s = "***"
        elif "://" in s:
            s = redact_uri(s)
        out[k] = s[:6000]
    return out


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
        return retry(c.create_experiment, name)
    except Exception:  # noqa: BLE001 - created concurrently
        return retry(c.get_experiment_by_name, name).experiment_id


def find_runs(uri: str, exp_id: str, filter_string: str) -> list:
    return retry(client(uri).search_runs, [exp_id], filter_string=filter_string, max_results=10000)


def parent_run(uri: str, exp_id: str, sweep_name: str, run_id: Optional[str]) -> str:
    c = client(uri)
    if run_id:
        run = retry(c.get_run, run_id)
        if run.info.status != "RUNNING":
            retry(c.update_run, run_id, status="RUNNING")
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
        for k, v in tags.items():
            retry(c.set_tag, run.info.run_id, k, v)
        return run
    return retry(c.create_run, exp_id, run_name=trial_name,
                 tags={"mlflow.parentRunId": parent_id, TRIAL_TAG: trial_name, ROLE_TAG: "trial", **tags})


def log_params(uri: str, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param
    c = client(uri)
    existing = retry(c.get_run, run_id).data.params
    items = [Param(k, v) for k, v in params.items() if k not in existing]
    for i in range(0, len(items), 100):
        retry(c.log_batch, run_id, params=items[i: i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
    from mlflow.entities import Metric
    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
    for i in range(0, len(items), 500):
        retry(client(uri).log_batch, run_id, metrics=items[i: i + 500])


def end_run(uri: str, run_id: str, status: str, reason: Optional[str] = None) -> None:
    c = client(uri)
    if reason:
        retry(c.set_tag, run_id, REASON_TAG, reason[:5000])
    retry(c.set_terminated, run_id, status=status)


def close_open_children(uri: str, exp_id: str, parent_id: str, status: str, reason: str) -> int:
    """At sweep exit: no child run may stay RUNNING."""
    n = 0
    for run in find_runs(uri, exp_id, f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'RUNNING'"):
        end_run(uri, run.info.run_id, status, reason)
        n += 1
    return n


class EpochLogger:
    """A Ray Train callback: every report of rank 0 goes to the trial's MLflow run as it happens."""

    def __new__(cls, uri: str, run_id: str):
        from ray.train import UserCallback

        class _Logger(UserCallback):
            def __init__(self):
                self.uri, self.run_id = uri, run_id

            def after_report(self, run_context, metrics, checkpoint):
                m = dict(metrics[0])
                phase = m.pop("phase", "pretrain")
                step = int(m.pop("epoch", 0))
                m.pop("step", None)
                if phase == "finetune":
                    m = {k if k.startswith("finetune") else f"finetune_{k}": v for k, v in m.items()}
                try:
                    log_metrics(self.uri, self.run_id, m, step)
                except Exception as e:  # noqa: BLE001 - never kill training over a metric
                    print(f"[mlflow] could not log epoch {step} metrics: {e}", flush=True)

        return _Logger()
