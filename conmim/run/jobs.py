"""Sweeps on an existing Ray cluster, through the Ray Jobs API.

``conmim sweep FILE --address http://127.0.0.1:8265`` (a tunnel to the head) ships this project (``runtime_env`` working_dir,
without virtualenvs, results, databases, data or git history) and runs
``python -m conmim.cli sweep FILE ...`` on the cluster as a Ray job: the job's driver finds the
cluster through ``RAY_ADDRESS``, which Ray sets for it. The logs are streamed back; Ctrl-C stops
following them and leaves the job running. ``conmim jobs status|logs|stop`` act on a job by id.

Ray's token authentication stays on: the client sends the cluster's token, read the way Ray
reads it (``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``).
It is sent only over https:// or to a loopback address (a tunnel); plain http:// to another host is
refused unless the caller passes ``insecure_http`` (``--insecure-http``), see :func:`check_transport`."""
from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import yaml

from conmim.config.errors import ConfigError
from conmim.run.secret_sets import JOB_DIR, SECRET_SETS, shown_set, split_secret_sets, write_secret_sets

# Never shipped: virtualenvs, results, tracking stores, data and git history.
ROOT_EXCLUDES = (".venv", "venv", "runs", "ray_results", "mlruns", "mlartifacts", "data", ".git", ".pytest_cache",
                 "build", "dist")
ANYWHERE_EXCLUDES = ("__pycache__", "*.db", "*.db-journal", "*.egg-info", "*.pyc", "*.pt", "*.pth", "*.ckpt",
                     "checkpoints", "mlruns*")
# The same rules in Ray's (gitignore) syntax, for the runtime_env as well.
RUNTIME_ENV_EXCLUDES = [f"/{n}/" for n in ROOT_EXCLUDES] + [f"{p}" for p in ANYWHERE_EXCLUDES]
STOP_WAIT_S = 30               # SIGTERM -> SIGKILL grace of `ray job stop`: time to end the MLflow runs


class JobsError(RuntimeError):
    """Cluster unreachable, refused (authentication) or unknown job: one message, exit 2."""


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------
def read_token() -> Optional[str]:
    """The cluster's token, from where Ray itself looks (the first that is set)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(path).expanduser()] if path else [Path.home() / ".ray" / "auth_token"]
    for p in candidates:
        try:
            token = p.read_text().strip()
        except OSError:
            continue
        if token:
            return token
    return None


def normalize_address(address: str) -> str:
    """The dashboard's HTTP address (what ``ray job submit --address`` takes)."""
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise JobsError(f"--address {address}: give the Ray dashboard's address (http://127.0.0.1:8265 through a tunnel), "
                        "not a Ray Client address; jobs are submitted over the dashboard's HTTP API.")
    if "://" not in address:
        address = f"http://{address}"
    return address


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1: this machine (e.g. the local end of an SSH tunnel or a
    port-forward). Other names are not resolved: a name is only as loopback as its DNS answer."""
    host = (host or "").strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(address: str, insecure_http: bool = False) -> str:
    """The normalised address; JobsError when the cluster's token would cross the network in clear
    text (plain http:// to a host that is not this machine) and the caller did not opt in."""
    address = normalize_address(address)
    url = urllib.parse.urlsplit(address)
    if url.scheme == "http" and not is_loopback(url.hostname or "") and not insecure_http:
        raise JobsError(
            f"--address {address}: refusing to send the cluster's Ray token over plain http:// to {url.hostname}, "
            "which is not this machine: whoever can see the traffic could read the token and run code on the "
            "cluster, and nothing proves the answer comes from your cluster. Use an https:// address (TLS in front "
            "of the dashboard), or open a tunnel and give its local end: `ray dashboard CLUSTER.yaml`, "
            "`ssh -N -L 8265:127.0.0.1:8265 HEAD` or `kubectl -n conmim port-forward svc/conmim-head-svc 8265:8265`, "
            "then --address http://127.0.0.1:8265. On a network you trust end to end, --insecure-http sends it "
            "anyway (cluster/README.md, 'Security'). Nothing was sent.")
    return address


def client(address: str, insecure_http: bool = False):
    """A ``JobSubmissionClient`` that carries the cluster's token (over https or loopback only,
    unless ``insecure_http``)."""
    address = check_transport(address, insecure_http)
    from ray.job_submission import JobSubmissionClient
    token = read_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError (401/403), ValueError
        hint = "" if token else (" No Ray token was found: set RAY_AUTH_TOKEN_PATH to the cluster's token file "
                                 "(cluster/README.md, 'Security').")
        raise JobsError(f"--address {address}: cannot use the Ray Jobs API there ({_first_line(e)}).{hint}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _call(fn: Callable, *a, what: str):
    try:
        return fn(*a)
    except RuntimeError as e:
        raise JobsError(f"{what}: {_first_line(e)}") from None


# ---------------------------------------------------------------------------------------------
# What is shipped
# ---------------------------------------------------------------------------------------------
def project_root() -> Path:
    """The folder holding this project (a checkout), else just the installed package."""
    import conmim
    pkg = Path(conmim.__file__).resolve().parent
    return pkg.parent if (pkg.parent / "pyproject.toml").exists() else pkg


def _ignore(root: Optional[Path]):
    """``root``: the checkout whose top-level folders ROOT_EXCLUDES names; None for an installed
    package, whose own folders (``conmim/data``) are code, never data to leave behind."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        out = {n for n in names if any(fnmatch.fnmatch(n, p) for p in ANYWHERE_EXCLUDES)}
        if root is not None and Path(folder).resolve() == root:
            out |= {n for n in names if n in ROOT_EXCLUDES}
        return out
    return ignore


@contextmanager
def staged_project(sweep_file: str):
    """A copy of the project to ship, and the sweep file's path inside it.

    A sweep file inside the project travels at its own relative path; one from elsewhere (and a
    base experiment file next to it) is copied into ``.conmim-job/``."""
    root = project_root()
    tmp = Path(tempfile.mkdtemp(prefix="conmim-job-"))
    try:
        work = tmp / "conmim"
        checkout = (root / "pyproject.toml").exists()
        if checkout:
            shutil.copytree(root, work, ignore=_ignore(root), symlinks=False)
        else:  # an installed package only: ship the package
            shutil.copytree(root, work / "conmim", ignore=_ignore(None))
        src = Path(sweep_file).resolve()
        try:
            if not checkout:
                raise ValueError("no checkout")
            rel = src.relative_to(root)
            if any(fnmatch.fnmatch(part, p) for part in rel.parts for p in ANYWHERE_EXCLUDES) or \
                    rel.parts[0] in ROOT_EXCLUDES:
                raise ValueError("excluded")
            entry = rel.as_posix()
        except ValueError:
            entry = _stage_outside_file(src, work / JOB_DIR)
        yield work, entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stage_outside_file(src: Path, job_dir: Path) -> str:
    job_dir.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load(src.read_text()) or {}
    base = raw.get("base")
    base_src = base.get("config") if isinstance(base, dict) else base
    if isinstance(base_src, str) and not Path(base_src).is_absolute() and (src.parent / base_src).is_file():
        dest = job_dir / Path(base_src).name
        shutil.copyfile(src.parent / base_src, dest)
        if isinstance(base, dict):
            base["config"] = dest.name
        else:
            raw["base"] = dest.name
    dest = job_dir / src.name
    dest.write_text(yaml.safe_dump(raw, sort_keys=False))
    return f"{JOB_DIR}/{src.name}"


# ---------------------------------------------------------------------------------------------
# Submission
# ---------------------------------------------------------------------------------------------
def check_cluster_sweep(sweep) -> None:
    """Outputs of a cluster sweep must land where every node (and you) can reach them."""
    spec = sweep.spec
    if not Path(spec.storage).is_absolute():
        raise ConfigError(f"{sweep.path}: storage is '{spec.storage}', a path relative to the job's temporary "
                          "working directory on the cluster; give an absolute path on a filesystem every node "
                          "mounts, e.g. --set storage=/mnt/shared/ray_results (cluster/README.md, 'Storage').")
    uri = spec.mlflow.tracking_uri
    if not uri:
        raise ConfigError(f"{sweep.path}: mlflow.tracking_uri is not set, so each run would go to an SQLite file in "
                          "the job's temporary working directory; point it at the shared MLflow server, e.g. "
                          "--set mlflow.tracking_uri=http://HEAD:5000 (cluster/mlflow-server.sh).")
    if uri.startswith("sqlite:") and not uri.startswith("sqlite:////"):
        raise ConfigError(f"{sweep.path}: mlflow.tracking_uri {uri} is relative; use the shared MLflow server "
                          "(http://...) or an absolute sqlite:////path on a shared filesystem.")


def entrypoint(sweep_entry: str, sets: tuple[str, ...] | list[str], resume: bool,
               resume_if_exists: bool = False, secret_sets_file: Optional[str] = None) -> str:
    args = ["python", "-m", "conmim.cli", "sweep", sweep_entry]
    for s in sets:
        args += ["--set", s]
    if secret_sets_file:
        args += ["--secret-sets", secret_sets_file]
    if resume:
        args.append("--resume")
    if resume_if_exists:
        args.append("--resume-if-exists")
    return " ".join(shlex.quote(a) for a in args)


def submit_sweep(sweep_file: str, sets: tuple[str, ...], resume: bool, address: str,
                 echo: Callable[[str], None] = print, resume_if_exists: bool = False,
                 insecure_http: bool = False) -> tuple[object, str]:
    """Validate here, ship the project, submit; returns (client, job id). Bad input: ConfigError;
    plain http to another host without ``insecure_http``: JobsError, before anything is read or sent."""
    from conmim.config.expand import load_sweep
    check_transport(address, insecure_http)
    sweep = load_sweep(sweep_file, list(sets), check_paths=False)  # the data lives on the cluster
    check_cluster_sweep(sweep)
    from conmim.data.preflight import check_sweep
    check_sweep(sweep, local_only=True, echo=echo)  # data found here is checked before anything is sent
    jc = client(address, insecure_http)
    job_id = f"conmim-{sweep.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    with staged_project(sweep_file) as (work, entry):
        runtime_env = {
            "working_dir": str(work),
            "excludes": RUNTIME_ENV_EXCLUDES,
            "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S)},
        }
        # Credentials in a --set (mlflow.tracking_uri=https://user:password@host) stay out of
        # what Ray stores and shows about the job: they travel in a private file of the working_dir
        # (shipped to the cluster like the code) that the entrypoint names.
        plain, secret = split_secret_sets(sets)
        secret_file = write_secret_sets(work, secret) if secret else None
        cmd = entrypoint(entry, plain, resume, resume_if_exists, secret_sets_file=secret_file)
        metadata = {"conmim.sweep": sweep.spec.name}
        if secret:
            metadata["conmim.secret_sets"] = "; ".join(shown_set(s) for s in secret)[:500]
        _call(lambda: jc.submit_job(entrypoint=cmd, submission_id=job_id, runtime_env=runtime_env,
                                    metadata=metadata),
              what=f"submitting to {normalize_address(address)}")
    from conmim.tracking.redact import redact_text
    echo(f"submitted Ray job {job_id} to {normalize_address(address)}\n  entrypoint: {redact_text(cmd)}")
    if secret:
        echo(f"  and from {SECRET_SETS} (kept out of the job's entrypoint and metadata): "
             + " ".join(f"--set {shown_set(s)}" for s in secret))
    return jc, job_id


def hints(job_id: str, address: str) -> str:
    a = shlex.quote(address)
    return (f"  follow: conmim jobs logs {job_id} --follow --address {a}\n"
            f"  status: conmim jobs status {job_id} --address {a}\n"
            f"  stop:   conmim jobs stop {job_id} --address {a}")


def follow(jc, job_id: str, write: Callable[[str], None]) -> str:
    """Stream the job's logs until it ends; returns its final status (a string)."""
    async def tail():
        async for chunk in jc.tail_job_logs(job_id):
            write(chunk)
    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a dropped connection: fall back to polling
        write(f"\n[conmim] log stream closed ({_first_line(e)}); waiting for the job to end\n")
    return wait(jc, job_id, timeout=None)


def wait(jc, job_id: str, timeout: Optional[float]) -> str:
    deadline = None if timeout is None else time.time() + timeout
    while True:
        status = _call(jc.get_job_status, job_id, what=f"job {job_id}")
        if status.is_terminal() or (deadline is not None and time.time() > deadline):
            return getattr(status, "value", str(status))
        time.sleep(1)


def status(address: str, job_id: str, insecure_http: bool = False) -> dict:
    jc = client(address, insecure_http)
    info = _call(jc.get_job_info, job_id, what=f"job {job_id}")
    return {"job": job_id, "status": str(info.status.value), "message": info.message or "",
            "entrypoint": info.entrypoint,
            "start_time": _ts(info.start_time), "end_time": _ts(info.end_time),
            "driver_exit_code": info.driver_exit_code}


def _ts(ms: Optional[int]) -> Optional[str]:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else None


def logs(address: str, job_id: str, follow_logs: bool, write: Callable[[str], None] = sys.stdout.write,
         insecure_http: bool = False) -> Optional[str]:
    jc = client(address, insecure_http)
    if follow_logs:
        return follow(jc, job_id, write)
    write(_call(jc.get_job_logs, job_id, what=f"job {job_id}"))
    return None


def stop(address: str, job_id: str, timeout: float = 60, insecure_http: bool = False) -> str:
    """Ask the job to stop (SIGTERM to its driver, which ends the trials' MLflow runs as KILLED;
    SIGKILL after ``STOP_WAIT_S``) and wait until it has; returns the final status."""
    jc = client(address, insecure_http)
    _call(jc.stop_job, job_id, what=f"job {job_id}")
    return wait(jc, job_id, timeout)
