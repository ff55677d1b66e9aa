"""MLflow bookkeeping: one parent run per sweep, exactly one child run per distinct trial.

Runs are found again by tags (never by an in-memory map), so a resumed sweep continues the runs
it already has instead of creating second ones."""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from conmim.config.uris import sqlite_file
from conmim.tracking import tags as T
from conmim.tracking.redact import redact_params, redact_tags, redact_text, redact_uri, redact_value


class TrackingUnavailable(RuntimeError):
    pass


def client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


_REST_GATEWAY_ERROR = re.compile(r"failed with error code (502|503|504) != 200")


def is_transient(e: BaseException) -> bool:
    """A blip worth retrying: a SQLite store locked by a concurrent writer (MLflow reports it as
    TEMPORARILY_UNAVAILABLE), a server that is restarting (HTTP 502/503/504, a refused or timed-out
    connection)."""
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE, ErrorCode
    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(e, MlflowException):
        return (e.error_code == ErrorCode.Name(TEMPORARILY_UNAVAILABLE)
                or e.get_http_status_code() in (502, 503, 504)
                # MLflow's REST client maps a 502 to INTERNAL_ERROR (HTTP 500): the answer's status is
                # then only in its message ("... failed with error code 502 != 200", rest_utils)
                or _REST_GATEWAY_ERROR.search(str(e.message)) is not None
                or any(is_transient(c) for c in (e.__cause__, e.__context__) if c is not None))
    return False


def retry(fn, *a, tries: int = 8, **kw):
    """``fn(*a, **kw)``, tried again with backoff while it fails with a transient error."""
    for i in range(tries):
        try:
            return fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - classified by is_transient
            if i == tries - 1 or not is_transient(e):
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
        status = getattr(e, "get_http_status_code", lambda: None)()
        login = (" It asks for a login (MLflow basic auth): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."
                 if status == 401 else "")
        raise TrackingUnavailable(f"mlflow.tracking_uri: {redact_uri(uri)} does not answer as an MLflow store ({e}).{login}") from None


def log_config(uri: str, run_id: str, config: dict, path: Path) -> None:
    """Write ``config`` (credentials masked) as YAML to ``path`` and log it as the run's artifact."""
    import yaml
    path.write_text(yaml.safe_dump(redact_value("", config), sort_keys=False))
    retry(client(uri).log_artifact, run_id, str(path))


def git_commit() -> Optional[str]:
    """The commit of the code that runs: the checkout the package is imported from, or, for a
    non-editable install (``pip install .`` or from a git URL), the commit pip recorded or the
    checkout it installed from (its ``direct_url.json``)."""
    import json
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    def head(root) -> Optional[str]:
        try:
            return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or None
        except Exception:  # noqa: BLE001
            return None

    if commit := head(Path(__file__).resolve().parents[1]):
        return commit
    try:
        url = json.loads(metadata.distribution("conmim").read_text("direct_url.json") or "{}")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return None
    if commit := url.get("vcs_info", {}).get("commit_id"):
        return commit
    src = urlparse(url.get("url", ""))
    return head(unquote(src.path)) if src.scheme == "file" else None


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


def find_runs(uri: str, exp_id: str, filter_string: str) -> list:
    return retry(client(uri).search_runs, [exp_id], filter_string=filter_string, max_results=10000)


def parent_run(uri: str, exp_id: str, sweep_name: str, run_id: Optional[str]) -> str:
    c = client(uri)
    if run_id:
        run = retry(c.get_run, run_id)
        if run.info.status != "RUNNING":
            retry(c.update_run, run_id, status="RUNNING")
        if T.REASON in run.data.tags:  # resumed: why it stopped last time no longer describes it
            retry(c.delete_tag, run_id, T.REASON)
        return run_id
    run = retry(c.create_run, exp_id, run_name=sweep_name, tags={T.ROLE: "sweep", T.SWEEP: sweep_name,
                                                                 **({T.GIT_COMMIT: git_commit()} if git_commit() else {})})
    return run.info.run_id


def child_run(uri: str, exp_id: str, parent_id: str, trial_name: str, tags: dict[str, str]):
    """The one run of this trial under this parent: found by tag, or created."""
    c = client(uri)
    found = find_runs(uri, exp_id, f"tags.`{T.PARENT_RUN_ID}` = '{parent_id}' and tags.`{T.TRIAL}` = '{trial_name}'")
    if found:
        run = found[0]
        if run.info.status != "RUNNING" and run.info.status != "FINISHED":
            retry(c.update_run, run.info.run_id, status="RUNNING")
            if T.REASON in run.data.tags:  # trained again: the old reason would mislabel the new run
                retry(c.delete_tag, run.info.run_id, T.REASON)
        for k, v in redact_tags(tags).items():
            retry(c.set_tag, run.info.run_id, k, v)
        return run
    return retry(c.create_run, exp_id, run_name=trial_name,
                 tags={T.PARENT_RUN_ID: parent_id, T.TRIAL: trial_name, T.ROLE: "trial", **redact_tags(tags)})


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
        retry(c.set_tag, run_id, T.REASON, redact_text(reason)[:5000])
    retry(c.set_terminated, run_id, status=status)


def close_open_children(uri: str, exp_id: str, parent_id: str, status: str, reason: str) -> int:
    """At sweep exit: no child run may stay RUNNING."""
    n = 0
    for run in find_runs(uri, exp_id, f"tags.`{T.PARENT_RUN_ID}` = '{parent_id}' and attributes.status = 'RUNNING'"):
        end_run(uri, run.info.run_id, status, reason)
        n += 1
    return n


def ui_links(ui: str, exp_id: str, parent_id: str | None = None) -> list[tuple[str, str]]:
    """Direct addresses in the MLflow UI at ``ui``: the sweep's run page (its description is the
    ablation table) and the experiment's runs table opened on the view :func:`trials_view` saved
    in the experiment (``viewStateShareKey``): each trial a row with its ``finetune_top1``, nothing
    folded. Both ask for MLflow 3's model-training view (``workflowType=machine_learning``); the
    experiment's ``mlflow.experimentKind`` tag asks the same of a UI opened without the parameter."""
    base = ui.rstrip("/")
    links = []
    if parent_id:
        links.append(("the sweep's run", f"{base}/#/experiments/{exp_id}/runs/{parent_id}?workflowType=machine_learning"))
    links.append(("trials", f"{base}/#/experiments/{exp_id}/runs?viewStateShareKey={T.TRIALS_VIEW_KEY}"
                            f"&workflowType=machine_learning"))
    return links


def trials_view(metric: str, now_ms: int | None = None) -> str:
    """The value of the experiment tag ``T.TRIALS_VIEW``: a saved view of MLflow 3's runs table
    (3.17's format, read in its JS bundle: an envelope ``{name, createdAt, updatedAt, state}``
    whose ``state`` is the JSON of the URL's search facets and the table's UI state). Sorting by a
    metric makes the table list child runs flat instead of folded under their parent (it nests
    them only when unsorted or sorted by date), and ``selectedColumns`` shows the metrics; which
    rows are expanded cannot be shared (MLflow drops ``runsExpanded`` from a shared view)."""
    import json
    cols = [f"metrics.`{m}`" for m in dict.fromkeys([metric, "finetune_top1", "finetune_val_top1",
                                                      "linear_probe_top1", "knn_top1"])]
    state = {"orderByKey": f"metrics.`{metric}`", "orderByAsc": False,
             "selectedColumns": cols + [f"tags.`{T.VARIANT}`", f"tags.`{T.SEED}`", "attributes.`Duration`"]}
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return json.dumps({"name": "conmim: trials", "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(state)})
