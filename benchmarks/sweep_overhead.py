"""Where a sweep's wall time goes, for the `tiny` family of presets.

    python benchmarks/sweep_overhead.py [--preset demo] [--trials 4] [--set key=value ...]

Runs a real sweep (local Ray, MLflow in a temporary SQLite file) of N trials and prints:
* overhead share: 1 - (sum of the trials' pre-training, probe and fine-tuning seconds) / sweep wall,
  i.e. Ray start, trial and worker-group start, MLflow logging, checkpoints, probes;
* packing: sum over trials of compute seconds x threads used / (sweep wall x cores).
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml

from conmim.sweep import collect_rows, run_sweep
from conmim.sweep_config import load_sweep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="conmim-sweep-overhead-"))
    sets = dict(s.split("=", 1) for s in args.set)
    spec = {"name": "overhead", "base": {"config": args.preset, "set": {k: yaml.safe_load(v) for k, v in sets.items()}},
            "seeds": list(range(args.trials)), "storage": str(tmp / "ray_results"),
            "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"}}
    (tmp / "s.yaml").write_text(yaml.safe_dump(spec))
    sweep = load_sweep(str(tmp / "s.yaml"))
    t = time.time()
    run_sweep(sweep, report=False)
    wall = time.time() - t
    rows = [r for r in collect_rows(sweep.dir) if r["status"] == "finished"]
    compute = sum(r["pretrain_seconds"] + r["probe_seconds"] + r["finetune_seconds"] for r in rows)
    threads = sweep.distinct[0].config.resources.num_workers * max(1, int(sweep.distinct[0].config.resources.cpus_per_worker))
    cores = os.cpu_count()
    print(f"trials {len(rows)}, sweep wall {wall:.1f} s, trial compute {compute:.1f} s")
    print(f"overhead share (not pre-training/fine-tuning compute): {100 * (1 - compute / wall):.1f} %")
    print(f"packing (compute x {threads} threads / (wall x {cores} cores)): {compute * threads / (wall * cores):.2f}")


if __name__ == "__main__":
    main()
