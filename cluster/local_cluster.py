#!/usr/bin/env python3
"""A real multi-node Ray cluster on this one machine, for development and tests.

    .venv/bin/python cluster/local_cluster.py start            # a head + 1 worker node, 2 CPUs each
    eval "$(.venv/bin/python cluster/local_cluster.py env)"     # the client's token and address
    conmim sweep sweeps/smoke.yaml --address "$RAY_API_SERVER_ADDRESS" \
        --set storage=$PWD/ray_results --set mlflow.tracking_uri=http://127.0.0.1:5000
    .venv/bin/python cluster/local_cluster.py status           # the nodes, as the cluster sees them
    .venv/bin/python cluster/local_cluster.py stop

Each node is its own `ray start` (its own raylet, object store, CPUs and a custom resource
``conmim_node_<i>``), so scheduling, placement groups, node failures and the Jobs API behave as on
a cloud cluster. Everything binds to 127.0.0.1, on ports away from Ray's defaults (GCS 6390,
dashboard 8275), with temp dirs of its own: it does not collide with a `ray.init()` or another
Ray on the machine.

Token authentication stays on: `start` writes a random token (``<dir>/auth_token``, mode 600) and
starts every node with ``RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<dir>/auth_token`` (Ray reads the
token from ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` names, or ``~/.ray/auth_token``);
clients use the same two variables (`env` prints them).

`stop` ends only this cluster: `ray stop` would stop every Ray process of the machine, so the
script finds this cluster's processes by its folder (the nodes' temp dirs) in their command lines and ends them and
all their descendants (workers, actors, job drivers): SIGTERM, then SIGKILL after a grace period.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_GCS_PORT = 6390
DEFAULT_DASHBOARD_PORT = 8275


def cluster_dir(gcs_port: int) -> Path:
    # short: Ray's Unix sockets live under it (sun_path is limited to ~107 bytes)
    return Path(f"/tmp/conmim-cluster-{gcs_port}")


def token_file(d: Path) -> Path:
    p = d / "auth_token"
    if not p.exists():
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    return p


def client_env(d: Path, dashboard_port: int) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file(d)),
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}


def _node_env(d: Path) -> dict[str, str]:
    from conmim.tracking.redact import environ_copy  # safe while MLflow's telemetry thread edits os.environ
    env = {k: v for k, v in environ_copy().items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    bindir = str(Path(sys.executable).parent)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file(d)), RAY_USAGE_STATS_ENABLED="0",
               # a job's entrypoint (`python -m conmim.cli ...`) finds this Python first
               PATH=bindir + os.pathsep + env.get("PATH", ""))
    return env


def _ray(d: Path, args: list[str], log) -> None:
    ray = str(Path(sys.executable).with_name("ray"))
    log.write(f"$ ray {' '.join(args)}\n")
    log.flush()
    r = subprocess.run([ray, *args], env=_node_env(d), stdout=log, stderr=subprocess.STDOUT, timeout=180)
    if r.returncode != 0:
        raise RuntimeError(f"`ray {args[0]} {args[1]}` failed (exit {r.returncode}); see {log.name}")


def start(gcs_port: int = DEFAULT_GCS_PORT, dashboard_port: int = DEFAULT_DASHBOARD_PORT, nodes: int = 2,
          cpus: float = 2, object_store_mb: int = 100, d: Path | None = None, timeout: float = 120) -> dict:
    """Start a head and ``nodes - 1`` worker nodes; wait until all are alive; return the addresses."""
    d = d or cluster_dir(gcs_port)
    d.mkdir(parents=True, exist_ok=True)
    temp = d / "ray"
    store = str(object_store_mb * 1024 * 1024)
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus), "--num-gpus", "0",
              "--object-store-memory", store, "--disable-usage-stats"]
    with open(d / "start.log", "a") as log:
        _ray(d, ["start", "--head", "--port", str(gcs_port), "--include-dashboard", "true",
                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
                 "--ray-client-server-port", str(gcs_port + 10),
                 "--dashboard-agent-listen-port", str(dashboard_port + 1), "--temp-dir", str(temp),
                 "--resources", json.dumps({"conmim_node_0": 1}), *common], log)
        for i in range(1, nodes):
            # a temp dir per node, as on separate machines: each node's runtime-env agent owns (and
            # garbage-collects) its own copy of a job's working_dir
            _ray(d, ["start", "--address", f"127.0.0.1:{gcs_port}",
                     "--dashboard-agent-listen-port", str(dashboard_port + 1 + i),
                     "--temp-dir", str(d / f"ray{i}"),
                     "--resources", json.dumps({f"conmim_node_{i}": 1}), *common], log)
    info = {"gcs_address": f"127.0.0.1:{gcs_port}", "dashboard": f"http://127.0.0.1:{dashboard_port}",
            "dir": str(d), "temp_dir": str(temp), **client_env(d, dashboard_port)}
    deadline = time.time() + timeout
    alive: list = []
    while time.time() < deadline:
        try:
            alive = [n for n in list_nodes(info["dashboard"], d) if n.get("state") == "ALIVE"]
        except OSError:
            alive = []
        if len(alive) >= nodes:
            break
        time.sleep(1)
    else:
        raise RuntimeError(f"only {len(alive)} of {nodes} nodes came up in {timeout} s; see {d / 'start.log'} "
                           f"and {temp}/session_latest/logs")
    info["node_ids"] = sorted(n["node_id"] for n in alive)
    (d / "cluster.json").write_text(json.dumps(info, indent=2))
    return info


def list_nodes(dashboard: str, d: Path) -> list[dict]:
    """The cluster's nodes from the State API (with the token, as every request needs it)."""
    token = token_file(d).read_text().strip()
    req = urllib.request.Request(f"{dashboard}/api/v0/nodes?limit=100&detail=true",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = json.loads(r.read())
    return _rows(body)


def _rows(obj) -> list[dict]:
    if isinstance(obj, list) and all(isinstance(x, dict) and "node_id" in x for x in obj):
        return obj
    if isinstance(obj, dict):
        for v in obj.values():
            rows = _rows(v)
            if rows:
                return rows
    return []


def _psutil():
    try:
        import psutil
    except ImportError:  # Ray ships it in ray/thirdparty_files, put on sys.path by `import ray`
        import ray  # noqa: F401
        import psutil
    return psutil


def _cluster_processes(d: Path):
    """Processes whose command line names a path in this cluster's folder (the nodes' temp dirs)."""
    psutil = _psutil()
    key = str(d.resolve()) + os.sep
    me = os.getuid()
    found = []
    for p in psutil.process_iter(["cmdline", "uids"]):
        try:
            if p.info["uids"] and p.info["uids"].real != me:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if key in cmd and p.pid != os.getpid():
            found.append(p)
    return found


def stop(gcs_port: int = DEFAULT_GCS_PORT, d: Path | None = None, grace: float = 10) -> int:
    """End this cluster's processes (found by its temp dir) and their descendants; returns how many."""
    psutil = _psutil()
    d = d or cluster_dir(gcs_port)
    roots = _cluster_processes(d)
    procs: dict[int, psutil.Process] = {}
    for p in roots:
        try:
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except psutil.Error:
            pass
        procs[p.pid] = p
    procs.pop(os.getpid(), None)
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["start", "stop", "status", "env"])
    ap.add_argument("--gcs-port", type=int, default=DEFAULT_GCS_PORT)
    ap.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT)
    ap.add_argument("--nodes", type=int, default=2, help="head included (default 2: a head and one worker node)")
    ap.add_argument("--cpus", type=float, default=2, help="logical CPUs of each node")
    ap.add_argument("--object-store-mb", type=int, default=100)
    ap.add_argument("--dir", type=Path, default=None, help="state, token and logs (default /tmp/conmim-cluster-PORT)")
    a = ap.parse_args(argv)
    d = a.dir or cluster_dir(a.gcs_port)
    if a.command == "start":
        info = start(a.gcs_port, a.dashboard_port, a.nodes, a.cpus, a.object_store_mb, d)
        print(f"Ray cluster up: {len(info['node_ids'])} nodes, dashboard {info['dashboard']} (loopback only)")
        print(f"clients need: eval \"$({sys.executable} {__file__} env --gcs-port {a.gcs_port} "
              f"--dashboard-port {a.dashboard_port})\"")
    elif a.command == "env":
        for k, v in client_env(d, a.dashboard_port).items():
            print(f"export {k}={v}")
    elif a.command == "status":
        for n in list_nodes(f"http://127.0.0.1:{a.dashboard_port}", d):
            print(n.get("node_id"), n.get("state"), "head" if n.get("is_head_node") else "worker",
                  json.dumps(n.get("resources_total", {})))
    else:
        n = stop(a.gcs_port, d)
        print(f"stopped {n} processes of the cluster in {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
