"""cluster/: the launcher config, the KubeRay manifests, and sweeps submitted as Ray jobs to a real
two-node Ray cluster on this machine (with token authentication) logging to an MLflow server."""
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from conmim.cli import main
from conftest import CONMIM, REPO, SMALL

CLUSTER = REPO / "cluster"
sys.path.insert(0, str(CLUSTER))
import local_cluster  # noqa: E402  (cluster/local_cluster.py)


# ---------------------------------------------------------------------------------------------
# Static checks: fast, nothing started
# ---------------------------------------------------------------------------------------------
def test_launcher_yaml_is_valid_for_the_installed_ray():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(cfg))  # Ray's own check, after its provider defaults are filled in
    assert cfg["head_node_type"] in cfg["available_node_types"]
    gpu = [t for t in cfg["available_node_types"].values() if "g5" in t["node_config"].get("InstanceType", "")]
    assert gpu and gpu[0]["max_workers"] >= 1 and gpu[0].get("min_workers", 0) == 0  # autoscaling GPU workers
    assert any("pip install" in c and "conmim" in c for c in cfg["setup_commands"])  # installs this project
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in starts
    assert "~/.ray/auth_token" in cfg["file_mounts"]


def _manifests():
    docs = []
    for f in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        docs += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def test_kuberay_manifests_parse_and_run_an_existing_sweep():
    docs = _manifests()
    ray_docs = {d["kind"]: d for _, d in docs if d["apiVersion"].startswith("ray.io")}
    assert set(ray_docs) == {"RayCluster", "RayJob"}
    assert all(d["apiVersion"] == "ray.io/v1" for d in ray_docs.values())
    rc, rj = ray_docs["RayCluster"], ray_docs["RayJob"]
    assert rc["spec"]["authOptions"]["mode"] == "token"  # token authentication on
    assert rc["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"  # not exposed
    assert rj["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    workers = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"]
    # the entrypoint is a conmim sweep of a sweep file that exists, with options the CLI accepts
    args = shlex.split(rj["spec"]["entrypoint"])
    assert args[:5] == ["python", "-m", "conmim.cli", "sweep", args[4]] and (REPO / args[4]).is_file()
    res = CliRunner().invoke(main, args[3:] + ["--dry-run"])
    assert res.exit_code == 0, res.output
    env = yaml.safe_load(rj["spec"]["runtimeEnvYAML"])
    assert int(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 10
    # every Service stays inside the cluster
    assert all(d["spec"].get("type", "ClusterIP") == "ClusterIP" for _, d in docs if d["kind"] == "Service")


def test_nothing_disables_ray_token_auth_or_binds_publicly():
    files = [p for p in CLUSTER.rglob("*") if p.suffix in (".py", ".sh", ".yaml", ".md") or p.name == "Dockerfile"]
    texts = {p: p.read_text() for p in files + list((REPO / "conmim").glob("*.py"))}
    for p, t in texts.items():
        assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*\"?disabled", t), p
    assert 'HOST="${MLFLOW_HOST:-127.0.0.1}"' in texts[CLUSTER / "mlflow-server.sh"]
    lc = texts[CLUSTER / "local_cluster.py"]
    assert '"--dashboard-host", "127.0.0.1"' in lc and 'RAY_AUTH_MODE="token"' in lc
    assert subprocess.run(["bash", "-n", str(CLUSTER / "mlflow-server.sh")]).returncode == 0


def _sweep_file(tmp_path, name, variants, tracking_uri, **base_set):
    spec = {"name": name,
            "base": {"config": "tiny", "set": {**{k: v for k, v in SMALL.items() if not k.startswith("resources.")},
                                               **base_set}},
            "seeds": [0], "variants": variants, "storage": str(tmp_path / "ray_results"),
            # one Train worker of 2 CPUs per trial: two trials never fit on one 3-CPU node
            "resources": {"num_workers": 1, "cpus_per_worker": 2, "threads_per_worker": 1, "max_concurrent_trials": 2},
            "mlflow": {"tracking_uri": tracking_uri}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_cluster_sweep_needs_shared_storage_and_tracking(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: s\nbase: tiny\n")
    r = CliRunner().invoke(main, ["sweep", str(p), "--address", "http://127.0.0.1:9"])
    assert r.exit_code == 2 and "storage" in r.output and "absolute" in r.output, r.output
    p.write_text(f"name: s\nbase: tiny\nstorage: {tmp_path}\n")
    r = CliRunner().invoke(main, ["sweep", str(p), "--address", "http://127.0.0.1:9"])
    assert r.exit_code == 2 and "mlflow.tracking_uri" in r.output, r.output
    p.write_text(f"name: s\nbase: tiny\nstorage: {tmp_path}\nmlflow: {{tracking_uri: 'http://127.0.0.1:9'}}\n")
    r = CliRunner().invoke(main, ["sweep", str(p), "--address", "127.0.0.1:9"])  # nobody listens there
    assert r.exit_code == 2 and "Jobs API" in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(main, ["jobs", "status", "x", "--address", "ray://127.0.0.1:10001"])
    assert r.exit_code == 2 and "dashboard" in r.output


def test_staged_project_ships_code_and_an_outside_sweep_file(tmp_path):
    from conmim.run import jobs
    (tmp_path / "exp.yaml").write_text("extends: tiny\nseed: 3\n")
    sweep = tmp_path / "outside.yaml"
    sweep.write_text("name: outside\nbase: {config: exp.yaml, set: {pretrain.epochs: 1}}\n")
    with jobs.staged_project(str(sweep)) as (work, entry):
        assert entry == ".conmim-job/outside.yaml" and (work / entry).is_file()
        assert (work / "conmim" / "cli.py").is_file() and (work / "pyproject.toml").is_file()
        assert not {".venv", ".git", "runs", "ray_results"} & {p.name for p in work.iterdir()}
        assert not list(work.rglob("*.db")) and not list(work.rglob("__pycache__"))
        from conmim.config.expand import load_sweep
        sw = load_sweep(str(work / entry))
        assert sw.distinct[0].config.seed == 0 and sw.distinct[0].config.pretrain.epochs == 1
    with jobs.staged_project(str(REPO / "sweeps" / "smoke.yaml")) as (work, entry):
        assert entry == "sweeps/smoke.yaml"
    cmd = jobs.entrypoint(entry, ["storage=/mnt/a b"], True)
    assert shlex.split(cmd) == ["python", "-m", "conmim.cli", "sweep", "sweeps/smoke.yaml", "--set",
                                "storage=/mnt/a b", "--resume"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_stop_the_sweep_driver_alike(tmp_path, sig):
    from conmim.run.stop import SignalStop, SweepStopped
    before = signal.getsignal(sig)
    stop = SignalStop(tmp_path)
    stop.install()
    with pytest.raises(KeyboardInterrupt) as e:  # the sweep's `except KeyboardInterrupt` path
        os.kill(os.getpid(), sig)
        time.sleep(5)
    assert isinstance(e.value, SweepStopped) and e.value.signame == sig.name
    assert (tmp_path / ".stopping").read_text() == sig.name  # running trials see the sweep going down
    os.kill(os.getpid(), sig)  # while the runs are being ended, a second signal is ignored
    time.sleep(0.1)
    stop.restore()
    assert signal.getsignal(sig) == before


# ---------------------------------------------------------------------------------------------
# A real two-node cluster and an MLflow server, shared by the slow tests of this module
# ---------------------------------------------------------------------------------------------
GCS_PORT, DASHBOARD_PORT = 6390, 8275


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def cluster():
    d = Path(f"/tmp/conmim-test-cluster-{GCS_PORT}")
    local_cluster.stop(GCS_PORT, d)  # leftovers of an earlier, killed run of these tests (this cluster only)
    shutil.rmtree(d, ignore_errors=True)
    try:
        info = local_cluster.start(GCS_PORT, DASHBOARD_PORT, nodes=2, cpus=3, object_store_mb=100, d=d)
        yield info
    finally:  # torn down even when a test (or the start) failed
        local_cluster.stop(GCS_PORT, d, grace=5)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    state = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = open(state / "server.log", "w")
    env = {**os.environ, "MLFLOW_PORT": str(port), "CONMIM_MLFLOW_DIR": str(state)}
    p = subprocess.Popen([str(CLUSTER / "mlflow-server.sh")], env=env, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # a cold `mlflow server` start takes 20-60 s on 2 busy cores
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2)
                break
            except Exception:  # noqa: BLE001
                assert p.poll() is None, (state / "server.log").read_text()
                assert time.time() < deadline, "mlflow server did not answer in 300 s:\n" + (state / "server.log").read_text()
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=30)


def _client_env(info):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=info["RAY_AUTH_TOKEN_PATH"], PYTHONUNBUFFERED="1")
    return env


def _runs(uri, experiment):
    from mlflow.tracking import MlflowClient
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else c.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_sweep_as_ray_job_on_two_nodes(cluster, mlflow_server, tmp_path):
    """Three trials, sampled by Optuna, submitted as a Ray job to the two-node cluster, logging to
    the MLflow server over HTTP."""
    path = _sweep_file(tmp_path, "twonodes", [], mlflow_server)
    spec = yaml.safe_load(path.read_text())
    spec.update(search="optuna", optuna={
        "num_samples": 3, "metric": "finetune_val_top1", "mode": "max",
        "space": {"objective.temperature": {"type": "loguniform", "low": 0.03, "high": 0.5},
                  "objective.momentum": {"type": "uniform", "low": 0.9, "high": 0.999}}})
    path.write_text(yaml.safe_dump(spec))
    env = _client_env(cluster)
    r = subprocess.run([CONMIM, "sweep", str(path), "--address", cluster["dashboard"]], capture_output=True,
                       text=True, env=env, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    job_id = re.search(r"submitted Ray job (\S+)", out).group(1)
    assert f"job {job_id}: SUCCEEDED" in out and "sweep 'twonodes' done: 3 finished" in out  # logs streamed back
    st = subprocess.run([CONMIM, "jobs", "status", job_id, "--address", cluster["dashboard"]], capture_output=True,
                        text=True, env=env, timeout=60)
    assert st.returncode == 0 and json.loads(st.stdout)["status"] == "SUCCEEDED", st.stdout + st.stderr
    # every trial FINISHED on the MLflow server, each tagged with the node it trained on
    runs = _runs(mlflow_server, "twonodes")
    children = [x for x in runs if x.data.tags.get("conmim.role") == "trial"]
    parent = next(x for x in runs if x.data.tags.get("conmim.role") == "sweep")
    assert parent.info.status == "FINISHED"
    assert len(children) == 3 and all(x.info.run_name.startswith("optuna_") for x in children)
    assert all(x.info.status == "FINISHED" for x in children), [(x.info.run_name, x.info.status) for x in children]
    temps = {float(x.data.params["objective.temperature"]) for x in children}
    assert len(temps) == 3 and all(0.03 <= t <= 0.5 for t in temps)  # Optuna sampled the space
    tags = {x.info.run_name: x.data.tags["conmim.node_id"] for x in children}
    rows = {row["trial"]: row for row in pq.read_table(tmp_path / "ray_results" / "twonodes" / "results.parquet").to_pylist()}
    assert {k: rows[k]["node_id"] for k in tags} == tags
    assert set(tags.values()) == set(cluster["node_ids"])  # trials ran on both nodes


@pytest.mark.slow
def test_jobs_stop_ends_trial_runs_as_killed(cluster, mlflow_server, tmp_path):
    # longer pre-training so that the trials are still running when the job is stopped
    path = _sweep_file(tmp_path, "stopme", [{"name": "t02", "set": {"objective.temperature": 0.2}}], mlflow_server,
                       **{"pretrain.epochs": 20})
    env = _client_env(cluster)
    r = subprocess.run([CONMIM, "sweep", str(path), "--address", cluster["dashboard"], "--no-follow"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = re.search(r"submitted Ray job (\S+)", r.stdout).group(1)
    assert f"conmim jobs stop {job_id}" in r.stdout
    deadline = time.time() + 240
    running = []
    while time.time() < deadline:
        running = [x for x in _runs(mlflow_server, "stopme")
                   if x.data.tags.get("conmim.role") == "trial" and x.info.status == "RUNNING"]
        if len(running) == 2:
            break
        time.sleep(1)
    assert len(running) == 2, subprocess.run([CONMIM, "jobs", "logs", job_id, "--address", cluster["dashboard"]],
                                             capture_output=True, text=True, env=env).stdout[-4000:]
    time.sleep(2)  # into the Train runs
    s = subprocess.run([CONMIM, "jobs", "stop", job_id, "--address", cluster["dashboard"]], capture_output=True,
                       text=True, env=env, timeout=180)
    assert s.returncode == 0 and f"job {job_id}: STOPPED" in s.stdout, s.stdout + s.stderr
    runs = _runs(mlflow_server, "stopme")
    assert [x.info.run_name for x in runs if x.info.status == "RUNNING"] == []
    children = [x for x in runs if x.data.tags.get("conmim.role") == "trial"]
    parent = next(x for x in runs if x.data.tags.get("conmim.role") == "sweep")
    assert len(children) == 2 and all(x.info.status == "KILLED" for x in children), \
        [(x.info.run_name, x.info.status) for x in children]
    assert all("SIGTERM" in x.data.tags["conmim.failure_reason"] for x in children)
    assert parent.info.status == "KILLED" and "SIGTERM" in parent.data.tags["conmim.failure_reason"]
    logs = subprocess.run([CONMIM, "jobs", "logs", job_id, "--address", cluster["dashboard"]], capture_output=True,
                          text=True, env=env, timeout=60).stdout
    assert "SIGTERM: stopping the sweep" in logs, logs[-3000:]
