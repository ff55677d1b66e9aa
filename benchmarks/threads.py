"""Two training processes on one machine (`make test`'s two pytest workers, two `--backend process`
runs side by side): each with torch's default of one thread per core, against each with its share
of the cores (what `resources.threads` and tests/conftest.py now set).

Each child process times the `tiny` pre-training step alone (real Fashion-MNIST batches made
beforehand) for --steps steps. A round runs two children at once with --oversubscribed threads each
(default: all the cores), then two with cores/2 each; rounds alternate, so the VM's drift lands in
both. Prints each pair's images/s (both processes together) and the ratio, shared over
oversubscribed, per round and as the median.

    python benchmarks/threads.py [--rounds 2] [--steps 40]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(threads: int, steps: int) -> None:
    import torch
    from conmim.config import load_config
    from conmim.data.masking import masks_for
    from conmim.data.sampler import ShardedBatches
    from conmim.data.sources import load_splits
    from conmim.data.transforms import TwoViewTransform
    from conmim.method.vit import param_groups
    from conmim.train.build import build_conmim, mask_generator
    from conmim.train.session import set_threads
    set_threads(threads)
    cfg = load_config("tiny", [])
    torch.manual_seed(0)
    train = load_splits(cfg.data)["train"]
    net = build_conmim(cfg)
    opt = torch.optim.AdamW(param_groups(net.online, 0.05), lr=1e-4)
    B = cfg.pretrain.batch_size
    tf = TwoViewTransform(cfg.augment, cfg.objective.perturbation, cfg.model.img_size, train.mean, train.std, cfg.seed)
    maskgen = mask_generator(cfg)
    premade = []
    for epoch, index in list(ShardedBatches(len(train), B, 0, 1, cfg.seed, 0))[:4]:
        x = train.batch(index, cfg.model.img_size)
        premade.append((*tf.views(x, tf.params(epoch, index, x.shape[2], x.shape[3])), masks_for(maskgen, cfg.seed, epoch, index)))

    def step(xo, xt, mask):
        loss_sum, _ = net(xo, xt, mask, mask)
        opt.zero_grad(set_to_none=True)
        (loss_sum / (B * net.rows)).backward()
        opt.step()
        net.update_momentum(0.996)

    for i in range(3):
        step(*premade[i % 4])
    t = time.perf_counter()
    for i in range(steps):
        step(*premade[i % 4])
    print(steps * B / (time.perf_counter() - t))


def pair(threads: int, steps: int) -> float:
    """images/s of two children running at once, summed."""
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(threads), "--steps", str(steps)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"a child failed: {outs}")
    return sum(float(o.split()[-1]) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--oversubscribed", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.steps)
    cores = os.cpu_count() or 1
    shared = max(1, cores // 2)
    print(f"{cores} cores; two processes at once, each {args.oversubscribed} threads (oversubscribed) "
          f"or {shared} (shared); {args.steps} steps of tiny's pre-training each")
    ratios = []
    for r in range(args.rounds):
        over, fair = pair(args.oversubscribed, args.steps), pair(shared, args.steps)
        ratios.append(fair / over)
        print(f"round {r + 1}: oversubscribed {over:.0f} img/s, shared {fair:.0f} img/s, ratio {fair / over:.2f}")
    print(f"median ratio shared / oversubscribed: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
