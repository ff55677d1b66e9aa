"""Hardening (issue 7): bad input, faults and security, each proven by a test that tries it.

Fast tests (bad-input corpus, storage pre-flight, path escapes, redaction, bind addresses, the
collapse flag in the report) run in-process. The fault tests start real processes (Ray, an
MLflow server, ``conmim sweep``) and are marked slow. docs/reliability.md lists every fault with
the test that proves it."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conmim.cli import main
from conmim.config import ConfigError
from conmim.tracking.stores import server_command, server_env
from conftest import AUTH_OFF, CONMIM, REPO, SMALL, wait_for

CORPUS = Path(__file__).parent / "bad_inputs"
BAD_FILES = sorted(CORPUS.glob("*.yaml"))


def expectations(path: Path) -> list[str]:
    """A corpus file starts with '# expect: a; b; c' - substrings the error message must contain."""
    head = path.read_bytes().split(b"\n", 1)[0].decode("ascii")
    assert head.startswith("# expect:"), path
    return [e.strip() for e in head.removeprefix("# expect:").split(";") if e.strip()]


@pytest.fixture
def no_ray(monkeypatch):
    """Anything that would start Ray fails the test instead (the input must be refused before)."""
    import conmim.run.ray_train

    def refuse(*a, **kw):
        raise AssertionError("Ray would have been started")
    monkeypatch.setattr(conmim.run.ray_train, "ensure_ray", refuse)


def invoke(args):
    res = CliRunner().invoke(main, args)
    return res, res.output


def assert_refused(res, out, *must):
    assert res.exit_code == 2, (res.exit_code, out, res.exception)
    assert "Traceback" not in out and out.startswith("conmim: error:"), out
    assert len(out.strip().splitlines()) == 1, out  # one message, not a dump
    for m in must:
        assert m in out, (m, out)


# ---------------------------------------------------------------------------------------------
# Bad input: the corpus, every file exits 2 before anything starts, with one message naming the
# file, the dotted key (or the line) and the bad value and what is allowed
# ---------------------------------------------------------------------------------------------
def test_corpus_is_big_enough():
    assert len(BAD_FILES) >= 30
    assert {p.name.split("_")[0] for p in BAD_FILES} == {"exp", "sweep"}


@pytest.mark.parametrize("path", BAD_FILES, ids=[p.name for p in BAD_FILES])
def test_bad_input_exits_2_with_one_message(path, no_ray):
    args = ["sweep", str(path), "--dry-run"] if path.name.startswith("sweep_") else ["validate", str(path)]
    t0 = time.time()
    res, out = invoke(args)
    assert_refused(res, out, str(path), *expectations(path))
    if "bomb" in path.name or "deep" in path.name:
        assert time.time() - t0 < 20  # refused, not expanded


def test_bad_sweep_refused_by_run_too(no_ray):
    """Not only --dry-run: the real command refuses the same file before any pre-flight."""
    path = CORPUS / "sweep_variant_unknown_override.yaml"
    res, out = invoke(["sweep", str(path)])
    assert_refused(res, out, str(path), "objective.tau")


def test_yaml_bomb_refused_without_expanding(tmp_path):
    """Ten levels of ten aliases = 10^10 strings if expanded: refused in well under a second and
    without the memory growth of an expansion. Measured in a fresh process that has loaded only
    the config loader (in this one, torch and earlier tests have already set a peak that would
    hide the growth), with its address space capped so that an expansion fails fast."""
    lines = ["l0: &l0 [" + ",".join(['"lol"'] * 10) + "]"]
    for i in range(1, 10):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]")
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\nseed: *l9\n")
    code = f"""
import resource, sys, time
from conmim.config import ConfigError
from conmim.config.loading import read_yaml
assert "torch" not in sys.modules
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 1024 ** 3, resource.RLIM_INFINITY))
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.time()
try:
    read_yaml({str(p)!r})
except ConfigError as e:
    assert "YAML bomb" in str(e), e
else:
    raise SystemExit("not refused")
print(time.time() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    seconds, grown_kib = map(float, r.stdout.split())
    assert seconds < 2 and grown_kib < 50 * 1024, (seconds, grown_kib)  # < 50 MB growth


def test_safe_loader_builds_no_python_objects(tmp_path):
    from conmim.config.loading import ConfigLoader
    assert issubclass(ConfigLoader, yaml.SafeLoader)
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.yaml"
    p.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    res, out = invoke(["validate", str(p)])
    assert_refused(res, out, str(p), "could not determine a constructor")
    assert not marker.exists()


def test_legitimate_anchors_still_work(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("extends: tiny\npretrain:\n  betas: &b [0.9, 0.95]\nfinetune:\n  crop_scale: *b\n")
    res, out = invoke(["validate", str(p)])
    assert res.exit_code == 0, out


def test_unreadable_file_a_directory_where_the_file_should_be(tmp_path, no_ray):
    for cmd in (["validate"], ["sweep"]):
        d = tmp_path / f"{cmd[0]}.yaml"
        d.mkdir()
        res, out = invoke([*cmd, str(d)])
        assert_refused(res, out, str(d), "cannot read the file", "Is a directory")


@contextmanager
def as_nobody():
    """Root reads whatever the mode bits say (CI runs as root): there the test reads as the user
    nobody (effective uid only, given back after). Anyone else reads as themselves."""
    if os.geteuid() != 0:
        yield
        return
    import pwd
    os.setegid(pwd.getpwnam("nobody").pw_gid)
    os.seteuid(pwd.getpwnam("nobody").pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def open_dir():
    """A folder anyone may enter (pytest's tmp_path is not: its parents are 0700)."""
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="conmim-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_unreadable_file_permission_denied(open_dir, no_ray):
    p = open_dir / "secret.yaml"
    p.write_text("seed: 1\n")
    p.chmod(0)
    invoke(["validate", str(open_dir / "missing.yaml")])  # (the same path as root first: what it imports lazily
    # is then loaded, as the user nobody may not read this checkout)
    with as_nobody():
        res, out = invoke(["validate", str(p)])
    assert_refused(res, out, str(p), "cannot read the file", "Permission denied")


def test_missing_and_oversized_files(tmp_path, no_ray):
    res, out = invoke(["sweep", str(tmp_path / "nope.yaml")])
    assert_refused(res, out, "nope.yaml", "No such file")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * 1_100_000 + "\nseed: 1\n")
    res, out = invoke(["validate", str(big)])
    assert_refused(res, out, str(big), "too large", "limit 1 MB")


def test_bad_set_on_a_sweep(no_ray):
    res, out = invoke(["sweep", str(REPO / "sweeps" / "smoke.yaml"), "--dry-run", "--set", "seeds=[x]"])
    assert_refused(res, out, "seeds.0", '"x"', "valid integer")
    res, out = invoke(["sweep", str(REPO / "sweeps" / "smoke.yaml"), "--dry-run", "--set", "name=../../evil"])
    assert_refused(res, out, "'name'", "../../evil")


def test_bad_sweep_in_a_real_process_starts_nothing(tmp_path):
    """A real `conmim sweep` process: exit 2, one line on stderr, and no Ray session folder, no
    storage folder and no MLflow database appear."""
    spec = yaml.safe_load((CORPUS / "sweep_variant_bad_value.yaml").read_text())
    spec |= {"storage": str(tmp_path / "ray_results"), "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    # a Ray started by this process would put its session folder under RAY_TMPDIR, i.e. in tmp_path
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "raytmp")}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([CONMIM, "sweep", str(path)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("conmim: error:") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert str(path) in p.stderr and "objective.temperature" in p.stderr and '"hot"' in p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.yaml"]  # no ray_results, mlflow.db, raytmp


# ---------------------------------------------------------------------------------------------
# Storage at start: unwritable or (nearly) full -> exit 2 before Ray
# ---------------------------------------------------------------------------------------------
def valid_sweep(tmp_path, **extra) -> Path:
    spec = {"name": "hz", "base": {"config": "tiny", "set": dict(SMALL)}, "seeds": [0],
            "storage": str(tmp_path / "ray_results"), "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            **extra}
    p = tmp_path / "hz.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_storage_path_under_a_file_exits_2(tmp_path, no_ray):
    (tmp_path / "afile").write_text("not a folder")
    path = valid_sweep(tmp_path, storage=str(tmp_path / "afile" / "results"))
    res, out = invoke(["sweep", str(path)])
    assert_refused(res, out, "storage", "cannot write the sweep folder", "Not a directory")
    assert not (tmp_path / "mlflow.db").exists()


@contextmanager
def read_only_folder(d: Path):
    """``d`` made read-only for whoever runs the test: a read-only mode for a user; for root (CI),
    whom modes do not stop, a read-only tmpfs mounted there, else the immutable attribute."""
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield "Permission denied"
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True).returncode == 0:
        try:
            yield "Read-only file system"
        finally:
            subprocess.run(["umount", str(d)], check=True)
    elif subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0:
        try:
            yield "Operation not permitted"
        finally:
            subprocess.run(["chattr", "-i", str(d)], check=True)
    else:
        pytest.skip("root without mount or chattr +i here: no way to make a folder read-only for root")


def test_storage_in_read_only_folder_exits_2(tmp_path, no_ray):
    with read_only_folder(tmp_path / "ro") as says:
        path = valid_sweep(tmp_path, storage=str(tmp_path / "ro" / "results"))
        res, out = invoke(["sweep", str(path)])
        assert_refused(res, out, "storage", says)
    assert not (tmp_path / "mlflow.db").exists()


def test_storage_without_enough_free_space_exits_2(tmp_path, no_ray):
    """The disk-full pre-flight: free space of the storage filesystem below min_free_gb. (A real
    full disk is not created here: the same check fires, and a failed probe write also exits 2.)"""
    path = valid_sweep(tmp_path, min_free_gb=1e9)  # an exabyte: more than any test machine has
    res, out = invoke(["sweep", str(path)])
    assert_refused(res, out, "storage: only", "GB free", "min_free_gb = 1e+09")
    assert not (tmp_path / "mlflow.db").exists()


def test_storage_probe_write_failure_is_exit_2(tmp_path, monkeypatch, no_ray):
    """ENOSPC while writing the probe file (what a full disk answers) -> exit 2, not a traceback."""
    import errno
    real = Path.write_bytes

    def full(self, data):
        if self.name == ".write-test":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", full)
    res, out = invoke(["sweep", str(valid_sweep(tmp_path))])
    assert_refused(res, out, "storage", "No space left on device")


def test_unwritable_sqlite_store_exits_2(tmp_path, no_ray):
    (tmp_path / "afile").write_text("x")
    path = valid_sweep(tmp_path, mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}"})
    res, out = invoke(["sweep", str(path)])
    assert_refused(res, out, "mlflow.tracking_uri", "cannot write the SQLite store")


# ---------------------------------------------------------------------------------------------
# Paths from configs cannot leave the storage folder
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", "../x", "a/../../x", "/etc", "../../../tmp/evil"])
def test_safe_child_refuses_escapes(tmp_path, name):
    from conmim.config.expand import safe_child
    with pytest.raises(ConfigError, match="leads outside"):
        safe_child(tmp_path, name)


def test_safe_child_allows_plain_names(tmp_path):
    from conmim.config.expand import safe_child
    assert safe_child(tmp_path, "ablations") == tmp_path.resolve() / "ablations"
    assert safe_child(tmp_path, "a..b") == tmp_path.resolve() / "a..b"


def test_trial_folders_stay_inside_the_sweep_folder(tmp_path):
    """Grid values become part of trial names; '/' and '..' in them cannot make a path escape."""
    from conmim.config.expand import load_sweep, safe_child
    path = valid_sweep(tmp_path, grid={"model.name": ["../../../tmp/evil", "/etc/passwd"]},
                       variants=[{"name": "v..1", "set": {"objective.temperature": 0.2}}])
    sw = load_sweep(str(path))
    assert sw.dir == (tmp_path / "ray_results" / "hz").resolve()
    for t in sw.trials:
        assert "/" not in t.name
        assert safe_child(sw.dir / "trials", t.name).parent == (sw.dir / "trials").resolve()


@pytest.mark.parametrize("name", [".", "..", "a..", "../up"])
def test_sweep_name_cannot_escape_storage(tmp_path, name, no_ray):
    path = valid_sweep(tmp_path, name=name)
    res, out = invoke(["sweep", str(path), "--dry-run"])
    assert_refused(res, out, "'name'")
    assert not (tmp_path / "ray_results").exists()


# ---------------------------------------------------------------------------------------------
# Secrets never reach MLflow params, tags or the config artifact
# ---------------------------------------------------------------------------------------------
SECRET_URI = "https://alice:hunter2-pass@data.example.com/fm.parquet?token=tok-abc123&page=2"


def test_redaction_against_a_real_mlflow_store(tmp_path, monkeypatch):
    """Log a trial's config the way run_one_trial does (child_run -> log_params -> log_config) to a
    real SQLite store and read everything back: no secret anywhere."""
    from mlflow.tracking import MlflowClient
    from conmim.config import build, load_source
    from conmim.tracking import client as tracking
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "env-secret-value-42")
    raw, _ = load_source("tiny")
    cfg = build(raw, {"data.name": "parquet", "data.root": SECRET_URI, "model.name": "vit_env-secret-value-42"},
                check_paths=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.experiment_id(uri, "redact")
    parent = tracking.parent_run(uri, exp, "redact", None)
    tags = {"conmim.overrides": json.dumps({"data.root": SECRET_URI}), "conmim.api_token": "tok-abc123",
            "conmim.note": "uses " + SECRET_URI}
    run = tracking.child_run(uri, exp, parent, "t_seed0", tags)
    rid = run.info.run_id
    tracking.log_params(uri, rid, cfg.flat())
    tracking.log_config(uri, rid, cfg.to_dict(), tmp_path / "config.yaml")
    tracking.end_run(uri, rid, "FAILED", f"could not open {SECRET_URI}")

    c = MlflowClient(uri)
    got = c.get_run(rid)
    art = Path(c.download_artifacts(rid, "config.yaml", str(tmp_path / "dl"))).read_text()
    everything = json.dumps(got.data.params) + json.dumps(got.data.tags) + art
    for secret in ("hunter2-pass", "tok-abc123", "env-secret-value-42"):
        assert secret not in everything, secret
    assert got.data.params["data.root"] == "https://alice:***@data.example.com/fm.parquet?token=***&page=2"
    assert got.data.params["model.name"] == "vit_***"
    assert got.data.tags["conmim.api_token"] == "***"
    assert "page=2" in got.data.tags["conmim.failure_reason"]
    assert yaml.safe_load(art)["data"]["root"] == got.data.params["data.root"]
    assert got.data.params["objective.temperature"] == "0.1"  # ordinary values untouched


def test_redaction_of_unreachable_tracking_uri_in_messages(tmp_path, no_ray):
    path = valid_sweep(tmp_path, mlflow={"tracking_uri": "http://bob:pa55word-xyz@127.0.0.1:9"})
    res, out = invoke(["sweep", str(path)])
    assert_refused(res, out, "mlflow.tracking_uri", "bob:***@127.0.0.1:9")
    assert "pa55word-xyz" not in out


@pytest.mark.parametrize("key,value,shown", [
    ("data.root", "s3://bucket/x.parquet?X-Amz-Signature=abc&X-Amz-Date=1", "s3://bucket/x.parquet?X-Amz-Signature=***&X-Amz-Date=1"),
    ("data.root", "https://ghp_0123456789abcdefghij@github.com/x", "https://***@github.com/x"),
    ("data.root", "/usr/share/datasets/fashion-mnist", "/usr/share/datasets/fashion-mnist"),
    ("mlflow.password", "pw", "***"),
    ("x.secret_key", "k", "***"),
    ("eval.knn_k", 20, "20"),
])
def test_redact_params_cases(key, value, shown):
    from conmim.tracking import redact
    assert redact.redact_params({key: value})[key] == shown


def test_redaction_survives_another_thread_changing_the_environment(monkeypatch):
    """MLflow's telemetry thread sets and unsets a variable at any time; iterating os.environ
    meanwhile raised KeyError in a trial's redaction and failed the trial (seen in a sweep)."""
    import threading
    from conmim.tracking import redact
    monkeypatch.setenv("CONMIM_TEST_API_TOKEN", "tok-0123456789")
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            os.environ["_CONMIM_CHURN"] = "1"
            os.environ.pop("_CONMIM_CHURN", None)
    t = threading.Thread(target=churn)
    t.start()
    try:
        deadline = time.time() + 2
        while time.time() < deadline:
            assert redact.redact_params({"data.root": "s3://b/tok-0123456789/x"})["data.root"] == "s3://b/***/x"
    finally:
        stop.set()
        t.join()


# ---------------------------------------------------------------------------------------------
# Servers bind to 127.0.0.1 unless the user passes a host; Ray's token authentication stays on
# ---------------------------------------------------------------------------------------------
def test_ui_binds_loopback_by_default(monkeypatch, tmp_path):
    from conmim.tracking import client as tracking
    calls, envs = [], []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append(argv) or envs.append(env))  # ui becomes the server
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracking.experiment_id(uri, "exists")  # conmim ui opens only an existing store
    res, out = invoke(["ui", "--tracking-uri", uri, "--port", "0"])
    assert res.exit_code == 0, out
    argv = calls[-1]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and "0.0.0.0" not in argv
    assert envs[-1]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false" and envs[-1]["PATH"] == os.environ["PATH"]
    res, out = invoke(["ui", "--tracking-uri", uri, "--host", "0.0.0.0", "--port", "0"])  # only when asked
    assert calls[-1][calls[-1].index("--host") + 1] == "0.0.0.0"


def test_local_ray_dashboard_binds_loopback(monkeypatch):
    import ray
    from conmim.run import ray_train as distributed
    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    distributed.ensure_ray(None, num_cpus=2)
    assert seen["dashboard_host"] == "127.0.0.1"
    assert not any("0.0.0.0" in str(v) for v in seen.values())


def test_local_ray_start_timeout_is_retried_once_and_other_errors_are_not(monkeypatch):
    """Ray's raylet gets a fixed 30 s to register; a loaded laptop can miss it once (seen in a clean-clone
    make test). That one error is retried once from a clean state; any other error, or a second
    timeout, reaches the user unchanged."""
    import ray
    from conmim.run import ray_train as distributed
    timeout = Exception("The current node timed out during startup. This could happen because "
                        "the raylet failed to start or the GCS is overloaded.")
    calls, shutdowns = [], []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(len(calls)))

    def init_failing(errors):
        def init(**kw):
            calls.append(kw)
            if errors:
                raise errors.pop(0)
        return init

    monkeypatch.setattr(ray, "init", init_failing([timeout]))
    distributed.ensure_ray(None, num_cpus=2)
    assert len(calls) == 2 and calls[0] == calls[1] and shutdowns == [1]  # shut down between the two starts

    calls.clear(), shutdowns.clear()
    monkeypatch.setattr(ray, "init", init_failing([timeout, timeout]))
    with pytest.raises(Exception, match="timed out during startup"):
        distributed.ensure_ray(None, num_cpus=2)
    assert len(calls) == 2  # one retry, not a loop

    calls.clear(), shutdowns.clear()
    monkeypatch.setattr(ray, "init", init_failing([ValueError("object_store_memory is too large")]))
    with pytest.raises(ValueError, match="object_store_memory"):
        distributed.ensure_ray(None, num_cpus=2)
    assert len(calls) == 1 and shutdowns == []


@pytest.mark.parametrize("module", ["torch", "torch.nn.modules.module", "ray", "ray.train.torch", "mlflow", "timm"])
def test_the_installed_stack_has_its_bytecode(module):
    """The install byte-compiles (no `pip install --no-compile`). With PYTHONDONTWRITEBYTECODE set, as
    on this VM and in many CI images, nothing writes a .pyc later, and every process that imports the
    stack compiles it from source: 29 against 11 CPU s per import (benchmarks/import_cost.py). That
    doubled make test's wall time from 70dab4b to 5e4b689. A .venv installed in that window:
    `.venv/bin/python -m compileall -q .venv/lib`."""
    import importlib.util
    origin = importlib.util.find_spec(module).origin
    assert os.path.exists(importlib.util.cache_from_source(origin)), f"no bytecode for {origin}"


def test_the_install_commands_byte_compile():
    for path in (REPO / "Makefile", REPO / ".ci" / "run"):
        installs = [line for line in path.read_text().splitlines() if "pip install" in line and "'.[dev]'" in line]
        assert installs and not any("--no-compile" in line for line in installs), path


def test_token_authentication_is_not_disabled_anywhere():
    """Ray's token auth (on by default for local clusters) is never switched off by code or docs."""
    files = [p for d in ("conmim", "cluster", "docs", "sweeps", "benchmarks", ".ci") if (REPO / d).exists()
             for p in (REPO / d).rglob("*") if p.is_file() and p.suffix in (".py", ".sh", ".md", ".yaml", ".yml", "")]
    files += [REPO / "README.md", REPO / "Makefile", REPO / "pyproject.toml"]
    offenders = [str(p.relative_to(REPO)) for p in files if AUTH_OFF.search(p.read_text(errors="replace"))]
    assert offenders == []


@pytest.mark.parametrize("text", [
    "RAY_AUTH_MODE=disabled ray start --head", 'export RAY_AUTH_MODE="off"', 'os.environ["RAY_AUTH_MODE"] = "disabled"',
    "os.environ['RAY_AUTH_MODE']='none'", 'os.environ.setdefault("RAY_AUTH_MODE", "disabled")',
    'os.putenv("RAY_AUTH_MODE", "disabled")', 'env.update(RAY_AUTH_MODE="disabled")', '{"RAY_AUTH_MODE": "disabled"}',
    "env:\n  - name: RAY_AUTH_MODE\n    value: disabled", 'ray.init(_system_config={"auth_mode": "disabled"})'])
def test_the_search_for_disabled_token_auth_sees_each_way_of_writing_it(text):
    assert AUTH_OFF.search(text)
    assert not AUTH_OFF.search(text.replace("disabled", "token").replace("none", "token").replace("off", "token"))


# ---------------------------------------------------------------------------------------------
# Numbers that lie: a collapsed pre-training fine-tuned to chance is flagged, not averaged away
# ---------------------------------------------------------------------------------------------
def test_collapsed_trial_at_chance_is_flagged_in_the_report(tmp_path):
    """Result records from the real make_result() of a trial, through write_results (parquet) and
    make_report: the collapsed, at-chance trial is marked in the table and in results.parquet."""
    import pyarrow.parquet as pq
    from conmim.config import load_config
    from conmim.report import make_report
    from conmim.run.results import write_results
    from conmim.trial import make_result
    d = tmp_path / "sw"
    trials = []
    for name, variant, std, top1 in [("baseline_seed0", "baseline", 0.9, 0.82),
                                     ("collapse_seed0", "collapse", 0.001, 0.101)]:
        cfg = load_config("tiny", ["pretrain.epochs=1"])
        pre = {"final_target_std": std, "final_pretrain_loss": 2.7, "history": [{"epoch": 1, "target_std": std, "pretrain_loss": 2.7}]}
        ft = {"finetune_top1": top1, "finetune_val_top1": top1, "finetune_history": [], "finetune_seconds": 1.0}
        carry = {"pre": pre, "probe": {"linear_probe_top1": top1, "knn_top1": top1}, "pretrain_seconds": 1.0,
                 "probe_seconds": 1.0}
        make_result(cfg, {**carry, "ft": ft}, 10, wall=3.0).write(d / "trials" / name)
        trials.append({"name": name, "variant": variant, "seed": 0, "overrides": {}, "key": name, "alias_of": None,
                       "note": "", "config": cfg.to_dict()})
    (d / "trials.json").write_text(json.dumps(trials))
    write_results(d)
    rows = {r["trial"]: r for r in pq.read_table(d / "results.parquet").to_pylist()}
    assert rows["collapse_seed0"]["collapsed"] and rows["collapse_seed0"]["at_chance"]
    assert not rows["baseline_seed0"]["collapsed"] and not rows["baseline_seed0"]["at_chance"]
    md = make_report(d)["markdown"]
    line = next(l for l in md.splitlines() if l.startswith("| collapse |"))
    assert "1 collapsed" in line and "1 at chance" in line
    assert "COLLAPSED" in line  # in the number's own cell, not only in the notes
    base = next(l for l in md.splitlines() if l.startswith("| baseline |"))
    assert "collapsed" not in base.lower() and "chance" not in base
    assert "1 of 2 finished trials collapsed" in md  # a warning above the table


# ---------------------------------------------------------------------------------------------
# Faults with real processes (slow: they start Ray, Ray Train workers, MLflow servers)
# ---------------------------------------------------------------------------------------------
def test_metrics_buffered_while_mlflow_is_down_and_flushed_after(tmp_path):
    """The buffer itself, without Ray: a report to a dead server is kept on disk (not raised, not
    dropped), the next report or the end-of-trial flush sends it; a server that never comes back
    ends in an error naming the file that keeps the points."""
    from conmim.tracking import buffer, client
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = client.experiment_id(uri, "buf")
    rid = client.client(uri).create_run(exp).info.run_id
    pending = tmp_path / "trial" / buffer.PENDING_FILE
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.time()
    assert buffer.log_metrics_buffered(dead, rid, {"pretrain_loss": 2.5}, 1, pending) is False
    assert buffer.log_metrics_buffered(dead, rid, {"pretrain_loss": 2.4}, 2, pending) is False
    assert time.time() - t0 < 30  # a report does not hang on MLflow's minutes-long retries
    assert len(pending.read_text().splitlines()) == 2
    with pytest.raises(client.TrackingUnavailable, match=re.escape(str(pending))):
        buffer.flush_pending(dead, rid, pending, wait_s=1)
    assert len(pending.read_text().splitlines()) == 2  # giving up keeps them
    # the server answers again: the next report sends the backlog first, in order, then itself
    assert buffer.log_metrics_buffered(uri, rid, {"pretrain_loss": 2.3}, 3, pending) is True
    hist = client.client(uri).get_metric_history(rid, "pretrain_loss")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(1, 2.5), (2, 2.4), (3, 2.3)]
    assert not pending.exists() and buffer.flush_pending(uri, rid, pending) == 0


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def sweep_spec(tmp_path, name, uri, variants=(), **over):
    spec = {"name": name, "base": {"config": "tiny", "set": {**SMALL, **over}}, "seeds": [0],
            "variants": list(variants), "storage": str(tmp_path / "ray_results"), "mlflow": {"tracking_uri": uri}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 that a test can take down and bring back (same store)."""

    def __init__(self, tmp_path):
        self.port, self.tmp, self.proc = free_port(), tmp_path, None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self):
        log = open(self.tmp / "mlflow-server.log", "a")
        self.proc = subprocess.Popen(  # the server `conmim ui` starts, in its environment
            server_command(f"sqlite:///{self.tmp / 'server.db'}", "127.0.0.1", self.port),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=server_env())
        import urllib.request
        wait_for(lambda: urllib.request.urlopen(self.uri + "/health", timeout=2).status == 200, 300, "mlflow server")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server dies, no goodbye
            self.proc.wait(timeout=30)


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_mlflow_server_down_mid_sweep_metrics_buffered_then_flushed(ray_session, tmp_path):
    """The MLflow server is killed while a trial trains and comes back later: the trial keeps
    training (no restart), its per-epoch metrics wait in trials/<name>/mlflow-pending.jsonl and all
    reach MLflow once the server answers; the run ends FINISHED."""
    import threading
    from mlflow.tracking import MlflowClient
    from conmim.run.tune import run_sweep
    from conmim.config.expand import load_sweep
    server = MlflowServer(tmp_path)
    server.start()
    try:
        path = sweep_spec(tmp_path, "outage", server.uri, **{"pretrain.epochs": 3, "finetune.epochs": 2})
        sw = load_sweep(str(path))
        pending = sw.dir / "trials" / "baseline_seed0" / "mlflow-pending.jsonl"
        seen = {}

        def first_epoch_logged():
            c = MlflowClient(server.uri)
            exp = c.get_experiment_by_name("outage")
            runs = c.search_runs([exp.experiment_id], "tags.`conmim.role` = 'trial'")
            return runs and "pretrain_loss" in runs[0].data.metrics

        swept = threading.Event()  # set when run_sweep returns: the waits below then fail at once

        def outage():
            try:
                wait_for(first_epoch_logged, 600, "epoch 1 in MLflow", stop=swept.is_set)
                server.kill()
                seen["down"] = time.time()
                wait_for(pending.exists, 600, "a buffered metric point", stop=swept.is_set)
                seen["buffered"] = pending.read_text().splitlines()
                server.start()
                seen["up"] = time.time()
            except BaseException as e:  # noqa: BLE001
                seen["error"] = e
        t = threading.Thread(target=outage, daemon=True)
        t.start()
        try:
            counts = run_sweep(sw)
        finally:
            swept.set()
        t.join(timeout=300)
        assert "error" not in seen, seen.get("error")
        assert counts == {"finished": 1}, counts
        assert seen["buffered"]  # metrics were held back while the server was down...
        assert not pending.exists()  # ...and all sent afterwards
        c = MlflowClient(server.uri)
        exp = c.get_experiment_by_name("outage")
        run = c.search_runs([exp.experiment_id], "tags.`conmim.role` = 'trial'")[0]
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "pretrain_loss")) == [1, 2, 3]
        assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "finetune_loss")) == [1, 2]
        assert "finetune_top1" in run.data.metrics
        res = json.loads((sw.dir / "trials" / "baseline_seed0" / "result.json").read_text())
        assert not any("resumed_from_step" in e for e in res["pretrain_history"])  # training went on, no restart
    finally:
        server.kill()
