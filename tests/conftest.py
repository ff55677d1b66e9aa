"""Shared fixtures, and the two tiers of the suite.

Tiers. ``make test`` runs everything (CI). ``make test-fast`` runs ``-m "not slow"``: unit tests
of every module, no Ray, no real `conmim` training run beyond a few steps, <= 120 s in all on the
2-core VM. A test is in the slow tier when

* it uses a fixture in ``SLOW_FIXTURES`` (``ray_session``, the test cluster, an MLflow server):
  marked here, at collection, so nobody has to remember it; or
* it says so: ``@pytest.mark.slow`` on the test, or ``pytestmark = pytest.mark.slow`` on a module
  (anything that trains a whole trial, starts a `conmim` process that trains, compiles with
  torch.compile, or starts Ray/MLflow servers some other way).

A new test file (issues 29, 31, 33, ...) needs nothing for its unit tests; mark the heavy ones
``@pytest.mark.slow``. If you forget, ``make test-fast`` tells you: there a test that is not marked
slow and takes more than ``FAST_LIMIT_S`` CPU seconds (``$CONMIM_FAST_LIMIT_S``) fails with a message saying
to mark it.

Timeouts. Every test has a hard limit (pytest-timeout, ``timeout`` in pyproject.toml); a long
end-to-end test states its own with ``@pytest.mark.timeout(SECONDS)``. Synchronisation is by
event (a file, a log line, an MLflow status, a Ray state) with a deadline: ``wait_for`` below,
never a bare ``time.sleep``.
"""
import os
import re
import sys
import time
from pathlib import Path

import pytest

from conmim.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONMIM = str(Path(sys.executable).with_name("conmim"))

# `make test` runs two pytest processes on the 2 cores. With torch's default (a thread per core)
# in each, two tests computing at once put 4 OpenMP threads on 2 cores, and each step waits for a
# descheduled thread: 2.7-5.7x slower (benchmarks/threads.py), the "half-speed windows" of earlier
# runs. Each process gets its share of the cores, and so do the processes it starts (OMP_NUM_THREADS).
TEST_PROCESSES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if TEST_PROCESSES > 1:
    from conmim.train.session import set_threads
    set_threads(max(1, (os.cpu_count() or 1) // TEST_PROCESSES))

# A few hundred real images, one epoch: every test that trains uses this shape.
SMALL = {
    "data.subset": 256, "data.eval_subset": 256,
    "pretrain.epochs": 1, "pretrain.batch_size": 64, "pretrain.warmup_epochs": 0,
    "finetune.epochs": 1, "finetune.batch_size": 64, "finetune.warmup_epochs": 0,
    "eval.probe_epochs": 2, "resources.cpus_per_worker": 1,
}


# Ray's token authentication switched off, in any of the ways code, shell, YAML or a manifest can
# say it: RAY_AUTH_MODE=disabled, os.environ["RAY_AUTH_MODE"] = "off", setdefault("RAY_AUTH_MODE",
# "none"), {"RAY_AUTH_MODE": ...}, a Kubernetes env entry (name: RAY_AUTH_MODE / value: disabled),
# auth_mode="disabled". (A text search misses a value built at run time: the cluster tests also
# show the cluster refusing a client without the token.)
AUTH_OFF = re.compile(
    r"""RAY_AUTH_MODE['"]?\]?\s*(?:[=:,]|\n\s*value\s*:)\s*['"]?(?:disabled|none|off)\b"""
    r"""|auth_mode['"]?\s*[=:,]\s*['"]?(?:disabled|none|off)\b""", re.I)

SLOW_FIXTURES = {"ray_session", "cluster", "mlflow_server"}
FAST_LIMIT_S = float(os.environ.get("CONMIM_FAST_LIMIT_S", 30))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    start = _cpu_seconds()
    yield
    item.cpu_seconds = _cpu_seconds() - start


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In the fast tier (``-m "not slow"``), a test whose work takes long fails and says why. Its
    CPU seconds are counted (this process and the processes it waited for), not the wall clock,
    which other work on a shared machine stretches."""
    outcome = yield
    rep = outcome.get_result()
    fast_tier = "not slow" in (item.config.getoption("markexpr") or "")
    cpu = getattr(item, "cpu_seconds", 0.0)
    if (fast_tier and rep.when == "call" and rep.passed and cpu > FAST_LIMIT_S
            and item.get_closest_marker("slow") is None):
        rep.outcome = "failed"
        rep.longrepr = (f"{item.nodeid} took {cpu:.0f} CPU s, over the fast tier's {FAST_LIMIT_S:.0f} s a test: "
                        "mark it @pytest.mark.slow (tests/conftest.py explains the tiers)")


def wait_for(pred, timeout: float, what: str, step: float = 0.5, stop=None):
    """Poll ``pred`` until it returns something truthy (returned) or ``timeout`` s pass (an
    AssertionError naming ``what``). ``stop``: a callable; when it turns true first, the wait
    fails at once instead of running out its deadline (e.g. the process it waits on has ended)."""
    deadline = time.time() + timeout
    while True:
        try:
            got = pred()
        except Exception:  # noqa: BLE001 - e.g. a server still coming up, a store busy
            got = None
        if got:
            return got
        if stop is not None and stop():
            raise AssertionError(f"gave up waiting for {what}: what it waits on ended first")
        if time.time() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def session_actors(class_name: str | None = None) -> list:
    """The actors of this test process's Ray session, dead or alive (Ray's state API), found by the
    session's own GCS address: another local Ray on the machine (a `conmim` subprocess's) must not matter."""
    import ray
    from ray.util.state import list_actors
    filters = [("class_name", "=", class_name)] if class_name else None
    return list_actors(address=ray.get_runtime_context().gcs_address, filters=filters, limit=10_000,
                       raise_on_missing_output=False)


def small_cfg(**overrides):
    o = {**SMALL, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return load_config("tiny", [f"{k}={v}" for k, v in o.items()])


@pytest.fixture
def small():
    return small_cfg


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (Ray's own testing advice)."""
    import ray
    from conmim.run.ray_train import ensure_ray
    ensure_ray(num_cpus=4)
    yield ray
    ray.shutdown()
