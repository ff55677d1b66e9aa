"""Throughput of ConMIM pre-training on the `tiny` preset, in one process: the step alone on
pre-made tensors, and the project's real loop (`pretrain()`: batches of real Fashion-MNIST, the
two views, the masks, the step, the EMA, the per-epoch read-back), in one run.

Prints: model FLOPs per step; images/s of the step alone and of the real loop; their ratio (the
pipeline ratio); achieved FLOP/s of the step over a large fp32 matmul measured here (MFU); the
time one batch's data takes in the step's own process; peak RSS.

    python benchmarks/step.py [--set key=value ...] [--steps N] [--compile]
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from conmim.config import load_config  # noqa: E402
from conmim.data.masking import masks_for  # noqa: E402
from conmim.data.sampler import ShardedBatches  # noqa: E402
from conmim.data.sources import load_splits  # noqa: E402
from conmim.data.transforms import TwoViewTransform  # noqa: E402
from conmim.method.vit import param_groups  # noqa: E402
from conmim.train.build import build_conmim, mask_generator  # noqa: E402
from conmim.train.pretrain import pretrain  # noqa: E402
from conmim.train.session import LocalSession  # noqa: E402


def matmul_flops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = 0.0
    for _ in range(3):  # best of three: this machine is noisy
        a @ b
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--compile", action="store_true", help="pretrain.compile=true: the step's forward under torch.compile")
    args = ap.parse_args()
    sets = args.set + (["pretrain.compile=true"] if args.compile else [])
    cfg = load_config(args.preset, sets)
    torch.manual_seed(0)
    train = load_splits(cfg.data)["train"]
    net = build_conmim(cfg)
    model = torch.compile(net) if cfg.pretrain.compile else net
    opt = torch.optim.AdamW(param_groups(net.online, 0.05), lr=1e-4)
    B = cfg.pretrain.batch_size
    tf = TwoViewTransform(cfg.augment, cfg.objective.perturbation, cfg.model.img_size, train.mean, train.std, cfg.seed)
    maskgen = mask_generator(cfg)

    def step(xo, xt, mask):
        loss_sum, _ = model(xo, xt, mask, mask)
        loss = loss_sum / (B * net.rows)  # the count is fixed by the masking: nothing read back
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.online.parameters(), float("inf"))
        opt.step()
        net.update_momentum(0.996)

    def real_batch(epoch, index):
        xo, xt = tf(train.batch(index, cfg.model.img_size), epoch, index)
        return xo, xt, masks_for(maskgen, cfg.seed, epoch, index)

    batches = list(ShardedBatches(len(train), B, 0, 1, cfg.seed, 0))
    premade = [real_batch(*b) for b in batches[:4]]  # a few, cycled: not one cache-hot batch
    with FlopCounterMode(display=False) as fc:
        step(*premade[0])
    flops_per_step = fc.get_total_flops()
    t = time.perf_counter()
    for b in batches[4:14]:
        real_batch(*b)
    data_ms = (time.perf_counter() - t) / 10 * 1000

    def step_alone():
        for i in range(3):
            step(*premade[i % 4])
        t = time.perf_counter()
        for i in range(args.steps):
            step(*premade[i % 4])
        return args.steps * B / (time.perf_counter() - t)

    def real_loop():
        run = pretrain(load_config(args.preset, sets + ["pretrain.epochs=3", "eval.proxy_every=0",
                                                        "pretrain.checkpoint_every=100"]),
                       LocalSession(Path(tempfile.mkdtemp(prefix="conmim-step-")), "pretrain"))
        n = len(batches) * B
        return max(n / h["epoch_seconds"] for h in run["history"][1:])  # epoch 1 carries the warm-up

    # interleaved, best of each: the machine's noise falls on both
    alone = [step_alone()]
    loop = [real_loop()]
    alone.append(step_alone())
    alone_ips, loop_ips = max(alone), max(loop)
    peak = matmul_flops()
    achieved = flops_per_step * alone_ips / B
    print(f"preset={args.preset} batch={B} tokens={cfg.model.grid ** 2 + 1} threads={torch.get_num_threads()} "
          f"data.num_workers={cfg.data.num_workers}{' compiled' if cfg.pretrain.compile else ''}")
    print(f"model FLOPs per step      {flops_per_step / 1e9:.2f} GFLOP")
    print(f"images/s step alone       {alone_ips:.1f}   (runs: {', '.join(f'{x:.0f}' for x in alone)})")
    print(f"images/s real loop        {loop_ips:.1f}")
    print(f"pipeline ratio            {loop_ips / alone_ips:.3f}")
    print(f"data of one batch         {data_ms:.1f} ms (views + masks, in the step's process), "
          f"step {1000 * B / alone_ips:.0f} ms")
    print(f"achieved FLOP/s           {achieved / 1e9:.1f} GFLOP/s")
    print(f"matmul FLOP/s (2048^2)    {peak / 1e9:.1f} GFLOP/s")
    print(f"MFU                       {achieved / peak:.3f}")
    print(f"peak RSS                  {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
