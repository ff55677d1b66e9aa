"""What a process pays to import the stack (torch, timm, Ray Train, MLflow) with and without bytecode.

Every Ray worker, every `conmim` command and every test that starts a subprocess imports the stack.
Where `PYTHONDONTWRITEBYTECODE=1` is set (this VM, many CI images, Docker recipes) Python never
writes a `.pyc`, so if the install did not byte-compile (`pip install --no-compile`) every process
compiles some thousands of modules from source, every time.

Each round runs the import in a fresh interpreter twice: once reading bytecode from a prefix filled
by a warm-up run (PYTHONPYCACHEPREFIX), once from an empty prefix with writing off, i.e. compiling
from source. Rounds alternate, so the VM's drift lands on both. Prints both CPU times, the ratio per
round and the median, and whether this venv's installed torch has its bytecode.

    python benchmarks/import_cost.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import statistics
import subprocess
import sys
import tempfile

STACK = "import torch, timm, ray.train.torch, mlflow"


def import_cpu_s(prefix: str, write: bool) -> float:
    env = dict(os.environ, PYTHONPYCACHEPREFIX=prefix)
    if write:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", STACK], env=env, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def installed_bytecode() -> bool:
    origin = importlib.util.find_spec("torch").origin
    return os.path.exists(importlib.util.cache_from_source(origin))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cached, tempfile.TemporaryDirectory() as empty:
        import_cpu_s(cached, write=True)  # warm-up: fills the bytecode prefix
        ratios = []
        for r in range(args.rounds):
            with_bc = import_cpu_s(cached, write=False)
            from_src = import_cpu_s(empty, write=False)
            ratios.append(from_src / with_bc)
            print(f"round {r}: with bytecode {with_bc:.1f} CPU s, from source {from_src:.1f} CPU s, "
                  f"ratio {ratios[-1]:.2f}x", flush=True)
    print(f"median ratio, from source over bytecode: {statistics.median(ratios):.2f}x ({STACK})")
    print(f"this venv's torch has installed bytecode: {installed_bytecode()}; "
          f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '(unset)')}")


if __name__ == "__main__":
    main()
