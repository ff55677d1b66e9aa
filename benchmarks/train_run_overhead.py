"""What Ray Train's per-run machinery costs a trial, with and without the ``DatasetManager``
actor that Ray Train 2.60 starts for every run, Ray Datasets or not
(``conmim.run.ray_train.SKIP_UNUSED_DATASET_MANAGER``).

    python benchmarks/train_run_overhead.py --runs 4 [--set data.subset=256 ...]

In one local Ray session, runs the same trial (``run_trial``: one Train run, pre-train, probes,
fine-tune) ``--runs`` times per arm, alternating the arms (skip, Ray's default, Ray's default,
skip, ...), and prints each run's wall and CPU seconds (every process of the machine, /proc/stat),
the actors each run started (Ray's state API), and the ratios skip / default. Run it on an
otherwise idle machine: the CPU figure is the machine's.
"""
import argparse
import tempfile
import time
from pathlib import Path

import conmim.run.ray_train as ray_train
from conmim.config import load_config
from sweep_overhead import busy_cpu_seconds  # (this folder)

SMALL = {"data.subset": 256, "data.eval_subset": 256, "pretrain.epochs": 1, "pretrain.batch_size": 64,
         "pretrain.warmup_epochs": 0, "finetune.epochs": 1, "finetune.batch_size": 64, "finetune.warmup_epochs": 0,
         "eval.probe_epochs": 2, "resources.cpus_per_worker": 1}


def actor_classes() -> dict:
    import ray
    from ray.util.state import list_actors
    return {a.actor_id: a.class_name for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                                          limit=10_000, raise_on_missing_output=False)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=4, help="runs per arm")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config("tiny", [f"{k}={v}" for k, v in {**SMALL, **dict(s.split("=", 1) for s in args.set)}.items()])
    ray_train.ensure_ray(num_cpus=4)
    tmp = Path(tempfile.mkdtemp(prefix="conmim-train-run-overhead-"))
    ray_train.run_trial(cfg, tmp / "warm-up")  # (the first run of a session also warms Ray's worker pool)
    got = {True: [], False: []}
    order = [skip for i in range(args.runs) for skip in ([True, False] if i % 2 == 0 else [False, True])]
    for i, skip in enumerate(order):
        ray_train.SKIP_UNUSED_DATASET_MANAGER = skip
        before = actor_classes()
        t, c = time.time(), busy_cpu_seconds()
        ray_train.run_trial(cfg, tmp / f"run{i}")
        wall, cpu = time.time() - t, busy_cpu_seconds() - c
        started = sorted(v for k, v in actor_classes().items() if k not in before)
        got[skip].append((wall, cpu))
        print(f"run {i + 1}: {'DatasetManager skipped' if skip else 'Ray default     '}: wall {wall:5.1f} s, "
              f"CPU {cpu:5.1f} s; actors started: {', '.join(started)}", flush=True)
    (ws, cs), (wd, cd) = [[sum(x[j] for x in got[k]) / len(got[k]) for j in (0, 1)] for k in (True, False)]
    print(f"skip / default ({args.runs} runs each): wall {ws / wd:.3f}, CPU {cs / cd:.3f}; "
          f"{cd - cs:.1f} CPU s saved per Train run")


if __name__ == "__main__":
    main()
