"""Throughput of the full ConMIM pre-training step on the `tiny` preset, in one process.

Prints: images/s with real Fashion-MNIST through the two-view transform and masking; images/s
on pre-made tensors (same shapes); their ratio (pipeline ratio); model FLOPs per step / step
time over the FLOP/s of a large fp32 matmul measured here (MFU); peak RSS.

    python benchmarks/step.py [--set key=value ...] [--steps N]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from conmim.train import schedules
from conmim.config import load_config
from conmim.data.sampler import ShardedBatches
from conmim.data.sources import load_splits
from conmim.data.masking import create_mask_generator, masks_for
from conmim.method.vit import param_groups
from conmim.train.build import build_conmim
from conmim.data.transforms import TwoViewTransform


def matmul_flops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    cfg = load_config(args.preset, args.set)
    torch.manual_seed(0)
    train = load_splits(cfg.data)["train"]
    net = build_conmim(cfg)
    opt = torch.optim.AdamW(param_groups(net.online, 0.05), lr=1e-4)
    B = cfg.pretrain.batch_size
    tf = TwoViewTransform(cfg.augment, cfg.objective.perturbation, cfg.model.img_size, train.mean, train.std, cfg.seed)
    maskgen = create_mask_generator(cfg.masking, cfg.model.grid)
    m_at = schedules.momentum(cfg.objective.momentum or 0.0, 10_000)

    def step(xo, xt, mask):
        loss_sum, _ = net(xo, xt, mask, mask)
        loss = loss_sum / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.online.parameters(), float("inf"))
        opt.step()
        net.update_momentum(float(m_at[0]))

    batches = [g for g in ShardedBatches(len(train), B, 0, 1, cfg.seed, 0)][: args.steps + 2]

    def real_batch(i):
        epoch, index = batches[i]
        xo, xt = tf(train.batch(index, cfg.model.img_size), epoch, index)
        return xo, xt, masks_for(maskgen, cfg.seed, epoch, index)

    fixed = real_batch(0)
    with FlopCounterMode(display=False) as fc:
        step(*fixed)
    flops_per_step = fc.get_total_flops()

    def timed(make):
        for i in range(2):
            step(*make(i))
        t = time.perf_counter()
        for i in range(2, args.steps + 2):
            step(*make(i))
        return args.steps * B / (time.perf_counter() - t)

    # interleave to share the machine's noise between the two measurements
    real, premade = [], []
    for _ in range(2):
        premade.append(timed(lambda i: fixed))
        real.append(timed(real_batch))
    real_ips, premade_ips = max(real), max(premade)
    peak = matmul_flops()
    achieved = flops_per_step * premade_ips / B
    print(f"preset={args.preset} batch={B} tokens={cfg.model.grid ** 2 + 1} threads={torch.get_num_threads()}")
    print(f"model FLOPs per step      {flops_per_step / 1e9:.2f} GFLOP")
    print(f"images/s real data        {real_ips:.1f}")
    print(f"images/s pre-made tensors {premade_ips:.1f}")
    print(f"pipeline ratio            {real_ips / premade_ips:.3f}")
    print(f"achieved FLOP/s           {achieved / 1e9:.1f} GFLOP/s")
    print(f"matmul FLOP/s (2048^2)    {peak / 1e9:.1f} GFLOP/s")
    print(f"MFU                       {achieved / peak:.3f}")
    print(f"peak RSS                  {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
