"""Ray Train on this machine: 1 vs 2 workers, and what Ray Train adds to a trial.

    python benchmarks/scaling.py [--preset tiny] [--set key=value ...]

1. Pre-training throughput (images/s inside the training loop) with 1 and 2 workers at the same
   global batch. On a 2-core machine expect ~1x: the point is the overhead, not a speed-up.
2. One whole trial (pre-train + probes + fine-tune) in this process vs on Ray Train (1 worker):
   the extra wall time is Ray start-up of the worker groups, checkpoint upload and reporting.
"""
import argparse
import tempfile
import time
from pathlib import Path

from conmim.config import load_config
from conmim.run.ray_train import ensure_ray, pretrain_phase, run_trial
from conmim.trial import run_in_process


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="conmim-scaling-"))
    ensure_ray(num_cpus=4)

    thr = {}
    for w in (1, 2):
        cfg = load_config(args.preset, args.set + [f"resources.num_workers={w}", f"resources.cpus_per_worker={2 // w}",
                                                   "pretrain.epochs=1"])
        res, _ = pretrain_phase(cfg, tmp / f"w{w}")
        n = (len_train(cfg) // cfg.pretrain.batch_size) * cfg.pretrain.batch_size
        thr[w] = n / res["history"][-1]["epoch_seconds"]
        print(f"pre-training, {w} worker(s): {thr[w]:.1f} images/s", flush=True)
    print(f"2 workers / 1 worker throughput: {thr[2] / thr[1]:.2f}x")

    cfg = load_config(args.preset, args.set)
    t = time.time()
    a = run_in_process(cfg, tmp / "inproc").to_json()
    inproc = time.time() - t
    t = time.time()
    b = run_trial(cfg, tmp / "ray").to_json()
    ray_wall = time.time() - t
    for name, r, wall in (("in-process", a, inproc), ("Ray Train", b, ray_wall)):
        print(f"trial {name}: {wall:.1f} s wall (pre-train {r['pretrain_seconds']:.1f} s, probes "
              f"{r['probe_seconds']:.1f} s, fine-tune {r['finetune_seconds']:.1f} s); fine-tuned top-1 "
              f"{r['finetune_top1']:.4f}, linear probe {r['linear_probe_top1']:.4f}, k-NN {r['knn_top1']:.4f}", flush=True)
    print(f"Ray Train overhead: {ray_wall - inproc:.1f} s = {100 * (ray_wall - inproc) / ray_wall:.1f} % of the trial")
    # the two parts of it: starting and stopping the Train run (controller, worker group, imports in
    # fresh processes), a fixed cost; and the loop itself running slower or faster inside a worker
    fixed = ray_wall - _compute(b)
    print(f"  start/stop of the Train run: {fixed:.1f} s; training loop on Ray minus in-process: "
          f"{_compute(b) - _compute(a):+.1f} s ({100 * (_compute(b) / _compute(a) - 1):+.1f} %)")


def _compute(r):
    return r["pretrain_seconds"] + r["probe_seconds"] + r["finetune_seconds"]


def len_train(cfg):
    from conmim.data.sources import load_splits
    return len(load_splits(cfg.data)["train"])


if __name__ == "__main__":
    main()
