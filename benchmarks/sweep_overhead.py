"""Where a sweep's wall time goes, for the `tiny` family of presets.

    python benchmarks/sweep_overhead.py [--preset demo] [--trials 4] [--concurrency 1] [--set key=value ...]

Runs a real sweep (local Ray, MLflow in a temporary SQLite file) of N trials and prints:
* overhead share: 1 - (sum of the trials' pre-training, probe and fine-tuning seconds) /
  (sweep wall x concurrent trials), i.e. the part of each trial slot's time spent on Ray start,
  trial and worker-group start, MLflow logging, checkpoints;
* packing: sum over trials of compute seconds x threads used / (sweep wall x cores).

    python benchmarks/sweep_overhead.py --from ray_results/ablations --wall 3900 --concurrency 2 --threads 1

computes the same two figures for a sweep that already ran (wall time from its log).

    python benchmarks/sweep_overhead.py --compare-reuse --trials 6 --concurrency 2 --set data.subset=256 ...

runs the same sweep 4 times in one Ray session, alternating Tune's trial processes reused
(``conmim.run.tune.REUSE_TRIAL_PROCESSES``) or not (on, off, off, on), and prints each run's wall
and CPU seconds (all processes of the machine, /proc/stat) and the ratios reused / not reused.
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml

from conmim.run.results import collect_rows
from conmim.run.tune import run_sweep
from conmim.config.expand import load_sweep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--from", dest="sweep_dir", default=None, help="a finished sweep's folder: no new run")
    ap.add_argument("--wall", type=float, help="with --from: the sweep's wall seconds")
    ap.add_argument("--concurrency", type=int, default=1, help="max_concurrent_trials (with --from: the one it ran with)")
    ap.add_argument("--threads", type=int, default=1, help="with --from: threads per trial")
    ap.add_argument("--compare-reuse", action="store_true", help="trial processes reused or not, alternating")
    args = ap.parse_args()
    if args.sweep_dir:
        return report(collect_rows(Path(args.sweep_dir)), args.wall, args.concurrency, args.threads)
    if args.compare_reuse:
        return compare_reuse(args)
    sweep = make_sweep(args, "overhead")
    t = time.time()
    run_sweep(sweep, report=False)
    wall = time.time() - t
    res = sweep.distinct[0].config.resources
    report(collect_rows(sweep.dir), wall, sweep.spec.resources.max_concurrent_trials,
           res.num_workers * max(1, int(res.cpus_per_worker)))


def make_sweep(args, name):
    tmp = Path(tempfile.mkdtemp(prefix="conmim-sweep-overhead-"))
    sets = dict(s.split("=", 1) for s in args.set)
    spec = {"name": name, "base": {"config": args.preset, "set": {k: yaml.safe_load(v) for k, v in sets.items()}},
            "seeds": list(range(args.trials)), "storage": str(tmp / "ray_results"),
            # trials at a time share the cores: one CPU (thread) per trial's worker each
            "resources": {"max_concurrent_trials": args.concurrency,
                          **({"cpus_per_worker": max(1, (os.cpu_count() or 1) // args.concurrency)}
                             if args.concurrency > 1 else {})},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"}}
    (tmp / "s.yaml").write_text(yaml.safe_dump(spec))
    return load_sweep(str(tmp / "s.yaml"))


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent (all processes: Ray's included) since boot."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def compare_reuse(args):
    from conmim.run import tune as sweep_module
    from conmim.run.ray_train import ensure_ray
    ensure_ray(log_to_driver=False)  # one Ray for all four runs: its start is not in either arm
    got = {True: [], False: []}
    for i, reuse in enumerate([True, False, False, True]):
        sweep_module.REUSE_TRIAL_PROCESSES = reuse
        sweep = make_sweep(args, f"reuse{i}")
        c, t = busy_cpu_seconds(), time.time()
        counts = run_sweep(sweep, report=False, echo=lambda *_: None)
        wall, cpu = time.time() - t, busy_cpu_seconds() - c
        got[reuse].append((wall, cpu))
        print(f"run {i + 1}: trial processes {'reused' if reuse else 'new per trial'}: wall {wall:.1f} s, "
              f"CPU {cpu:.1f} s, {counts}", flush=True)
    mean = {k: [sum(x[j] for x in v) / len(v) for j in (0, 1)] for k, v in got.items()}
    print(f"reused / new per trial ({args.trials} trials, {args.concurrency} at a time): "
          f"wall {mean[True][0] / mean[False][0]:.3f}, CPU {mean[True][1] / mean[False][1]:.3f}; "
          f"CPU saved per trial {(mean[False][1] - mean[True][1]) / args.trials:.1f} s")


def report(rows: list[dict], wall: float, concurrency: int, threads: int) -> None:
    rows = [r for r in rows if r["status"] == "finished"]
    compute = sum(r["pretrain_seconds"] + r["probe_seconds"] + r["finetune_seconds"] for r in rows)
    cores = os.cpu_count()
    print(f"trials {len(rows)}, sweep wall {wall:.1f} s, trial compute {compute:.1f} s, {concurrency} at a time")
    print(f"overhead share (not pre-training/fine-tuning compute): {100 * (1 - compute / (wall * concurrency)):.1f} %")
    print(f"packing (compute x {threads} threads / (wall x {cores} cores)): {compute * threads / (wall * cores):.2f}")


if __name__ == "__main__":
    main()
