"""MLflow calls are retried on transient errors, told apart by type (not by the text of a message),
against a real SQLite store and a port where no server listens."""
import sqlite3

import pytest

from conmim.tracking import client
from conmim.tracking.buffer import fail_fast


def test_a_locked_sqlite_store_is_retried(monkeypatch):
    """MLflow turns SQLite's "database is locked" (after its own 20 s busy wait) into this exception
    (mlflow/store/db/utils.py); a concurrent writer releases the lock, the next try goes through.
    The back-off is read from the waits retry() asks for, not from the wall clock of a busy machine."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
    tries, waits = [], []
    monkeypatch.setattr(client.time, "sleep", waits.append)

    def write():
        tries.append(len(waits))
        if len(tries) < 3:
            try:
                raise sqlite3.OperationalError("database is locked")
            except sqlite3.OperationalError as e:
                raise MlflowException(message=e, error_code=TEMPORARILY_UNAVAILABLE) from e
        return "written"
    assert client.retry(write) == "written" and tries == [0, 1, 2]  # a wait before each new try
    assert waits == [0.2, 0.4]  # backing off, doubling


def test_a_refused_connection_is_transient_and_a_missing_run_is_not(tmp_path):
    from mlflow.exceptions import MlflowException
    dead = client.client("http://127.0.0.1:9")
    try:
        with fail_fast():  # one try, not MLflow's minutes of retries
            dead.search_experiments(max_results=1)
    except MlflowException as e:
        assert client.is_transient(e)
    else:
        pytest.fail("nothing listens on port 9")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client.experiment_id(uri, "x")
    calls = []

    def missing():
        calls.append(1)
        return client.client(uri).get_run("0" * 32)
    with pytest.raises(MlflowException) as e:
        client.retry(missing)
    assert len(calls) == 1 and not client.is_transient(e.value)  # a real error is raised at once
    assert not client.is_transient(ValueError("database is locked"))  # the words alone do not make it transient


@pytest.mark.parametrize("status,transient", [(502, True), (503, True), (504, True), (500, False), (404, False)])
def test_a_gateway_or_unavailable_answer_is_transient_and_others_are_not(status, transient):
    """README: MLflow calls are retried on HTTP 502/503/504 (a proxy or a server restarting), not
    on an answer that another try would repeat. The exception is the one MLflow's own REST client
    makes of the HTTP answer (it maps a 502 to HTTP 500's error code)."""
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.utils.rest_utils import verify_rest_response
    resp = requests.models.Response()
    resp.status_code, resp._content = status, b"upstream said no"
    resp.headers["Content-Type"] = "text/plain"
    with pytest.raises(MlflowException) as e:
        verify_rest_response(resp, "/api/2.0/mlflow/runs/get")
    assert client.is_transient(e.value) is transient


def test_the_end_of_trial_wait_for_mlflow_is_conmim_mlflow_wait(tmp_path, monkeypatch):
    """docs/reliability.md: the trial waits up to $CONMIM_MLFLOW_WAIT seconds for the server, then
    fails naming the file that keeps the points."""
    import json
    import re
    from conmim.tracking import buffer
    pending = tmp_path / buffer.PENDING_FILE
    pending.write_text(json.dumps({"metrics": {"pretrain_loss": 2.5}, "step": 1, "ts": 0}) + "\n")
    monkeypatch.setenv("CONMIM_MLFLOW_WAIT", "1")
    with pytest.raises(client.TrackingUnavailable, match=r"did not answer for 1 s.*" + re.escape(str(pending))):
        buffer.flush_pending("http://127.0.0.1:9", "0" * 32, pending)
    assert pending.exists()
