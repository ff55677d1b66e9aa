"""What an `mlflow server` start costs the machine, with MLflow 3's job execution (its default:
seven Huey consumers for GenAI jobs) and without it (what `conmim ui`, cluster/mlflow-server.sh
and the tests start since the change).

Each start: time until /health answers, then the CPU seconds and the number of processes of the
server's session 20 s later. Starts alternate (on, off, on, off, ...), so the VM's drift lands in
both; prints each start and the ratio of the medians' CPU seconds.

    python benchmarks/mlflow_server.py [--rounds 2] [--settle 20]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def session_usage(sid: int) -> tuple[int, float]:
    """Processes of session ``sid`` and their CPU seconds (user + system), from /proc."""
    n, cpu = 0, 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # (field 6 of stat: the session id)
            n += 1
            cpu += (int(fields[11]) + int(fields[12])) / TICK
    return n, cpu


def start(jobs: bool, settle: float) -> tuple[float, int, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = Path(tempfile.mkdtemp(prefix="conmim-mlflow-bench-"))
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true" if jobs else "false"}
    t0 = time.perf_counter()
    p = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port",
                          str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{d / 's.db'}",
                          "--artifacts-destination", str(d / "a")], env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if p.poll() is not None or time.perf_counter() - t0 > 600:
                    sys.exit("the mlflow server did not start")
                time.sleep(0.5)
        health = time.perf_counter() - t0
        time.sleep(settle)  # (a benchmark's fixed window, not synchronisation)
        n, cpu = session_usage(p.pid)
        return health, n, cpu
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--settle", type=float, default=20.0)
    args = ap.parse_args()
    cpu = {True: [], False: []}
    for r in range(args.rounds):
        for jobs in (True, False):
            health, n, c = start(jobs, args.settle)
            cpu[jobs].append(c)
            print(f"round {r + 1}, job execution {'on ' if jobs else 'off'}: /health after {health:.0f} s; "
                  f"{args.settle:.0f} s later {n} processes, {c:.0f} CPU s")
    on, off = statistics.median(cpu[True]), statistics.median(cpu[False])
    print(f"median CPU s per start: on {on:.0f}, off {off:.0f}; ratio on / off {on / off:.2f}")


if __name__ == "__main__":
    main()
