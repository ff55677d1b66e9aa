"""Throughput of ConMIM pre-training on the `tiny` preset, in one process: the step alone on
pre-made tensors, and the project's real loop (`pretrain()`: batches of real Fashion-MNIST, the
two views, the masks, the step, the EMA, the per-epoch read-back), in one run.

Prints: model FLOPs per step; images/s of the step alone and of the real loop; their ratio (the
pipeline ratio); achieved FLOP/s of the step over a large fp32 matmul measured here (MFU); the
time one batch's data takes in the step's own process; peak RSS.

Both speeds are timed over windows of 10 steps, in interleaved rounds (step alone, real loop, x3),
and each is the 90th percentile of its windows: this VM's speed swings by 20-30 % within a minute,
which that percentile leaves out and a single timing of each would put into the ratio. Even so it
moves by several per cent between runs of the same code, so steadier figures come with it, where
the drift cancels pair by pair (medians of the pairs): the real loop, paired (each window of
pretrain() between two windows of the step alone, run at pretrain()'s read-backs), and the paired
ratio (adjacent windows of the step fed with batches made as pretrain() makes them, in the step's
process, and of the step alone).

    python benchmarks/step.py [--set key=value ...] [--windows N] [--epochs N] [--compile] [--compare-channels]
"""
from __future__ import annotations

import argparse
import re
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
from conmim.train.build import build_conmim, compiled, compiled_views, mask_generator  # noqa: E402
from conmim.train.pretrain import pretrain  # noqa: E402
from conmim.train.session import LocalSession  # noqa: E402

WINDOW = 10  # steps per timed window


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of the windows' speeds: the 90th percentile is the speed of an
    uncontended window, steadier than the single best one."""
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


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
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (step alone, real loop)")
    ap.add_argument("--windows", type=int, default=30, help="windows of the step alone per round")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the real loop per round")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--compile", action="store_true", help="pretrain.compile=true: the step's forward under torch.compile")
    ap.add_argument("--compare-channels", action="store_true",
                    help="also the paired ratio with a grey batch's three channels written out, alternating with the "
                         "one-channel views in the same process")
    args = ap.parse_args()
    sets = args.set + (["pretrain.compile=true"] if args.compile else [])
    cfg = load_config(args.preset, sets)
    torch.manual_seed(0)
    train = load_splits(cfg.data)["train"]
    net = build_conmim(cfg)
    model = compiled(net, cfg.pretrain.compile)
    opt = torch.optim.AdamW(param_groups(net.online, 0.05), lr=1e-4)
    B = cfg.pretrain.batch_size
    tf = TwoViewTransform(cfg.augment, cfg.objective.perturbation, cfg.model.img_size, train.mean, train.std, cfg.seed)
    views = compiled_views(tf, cfg.pretrain.compile)  # (as pretrain() makes them)
    maskgen = mask_generator(cfg)

    def step(xo, xt, mask):
        loss_sum, _ = model(xo, xt, mask, mask)
        loss = loss_sum / (B * net.rows)  # the count is fixed by the masking: nothing read back
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.online.parameters(), float("inf"))
        opt.step()
        net.update_momentum(0.996)

    def real_batch(epoch, index, written_out=False):
        x = train.batch(index, cfg.model.img_size)
        xo, xt = views(x.contiguous() if written_out else x, tf.params(epoch, index, x.shape[2], x.shape[3]))
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

    def window_alone() -> float:
        t = time.perf_counter()
        for i in range(WINDOW):
            step(*premade[i % 4])
        return time.perf_counter() - t

    def step_alone(windows: int) -> list[float]:
        for i in range(3):
            step(*premade[i % 4])
        return [WINDOW * B / window_alone() for _ in range(windows)]

    class Clocked(LocalSession):
        """At each mid-epoch read-back (every WINDOW steps, pretrain.log_every) notes the time and
        runs a window of the step alone, so that each window of the real loop lies between two of
        the step alone: the machine's drift cancels in their ratio, as in ``paired``."""
        def log(self, line):
            m = re.match(r"\[pretrain\] epoch (\d+) step (\d+)/", line)
            if m:
                t_end = time.perf_counter()
                alone = window_alone()
                self.marks.append((int(m[1]), int(m[2]), t_end, alone, time.perf_counter()))

    def real_loop() -> tuple[list[float], list[float]]:
        """images/s of the real loop's windows, and each window's ratio to the mean of the step
        alone's windows on either side of it."""
        session = Clocked(Path(tempfile.mkdtemp(prefix="conmim-step-")), "pretrain")
        session.marks = []
        pretrain(load_config(args.preset, sets + [f"pretrain.epochs={args.epochs}", "eval.proxy_every=0",
                                                  "pretrain.checkpoint_every=100", f"pretrain.log_every={WINDOW}"]),
                 session)
        speeds, ratios = [], []
        for (e0, s0, _, alone0, resumed), (e1, s1, t_end, alone1, _) in zip(session.marks, session.marks[1:]):
            if e0 == e1 and s1 - s0 == WINDOW:  # (windows inside an epoch)
                speeds.append(WINDOW * B / (t_end - resumed))
                ratios.append((alone0 + alone1) / 2 / (t_end - resumed))
        return speeds, ratios

    def paired(pairs: int, written_out: bool = False) -> list[float]:
        """Windows of the step fed as pretrain() feeds it (each batch made in this process: pixels,
        view parameters, masks, the two views) alternating with windows of the step alone: the
        ratio of each adjacent pair, so that the machine's drift cancels. ``written_out``: a grey
        batch's three channels written out, so that the views compute all three (as before e8c2300)."""
        fed = iter(batches * (1 + pairs * WINDOW // len(batches)))
        ratios = []
        for _ in range(pairs):
            t_alone = window_alone()
            t = time.perf_counter()
            for _ in range(WINDOW):
                step(*real_batch(*next(fed), written_out))
            ratios.append(t_alone / (time.perf_counter() - t))
        return ratios

    # interleaved: the machine's noise falls on both
    alone, loop, loop_pairs, pairs = [], [], [], []
    for _ in range(args.rounds):
        alone += step_alone(args.windows)
        speeds, ratios = real_loop()
        loop += speeds
        loop_pairs += ratios
        pairs += paired(args.windows)
    alone_ips, loop_ips = pct(alone, 0.9), pct(loop, 0.9)
    peak = matmul_flops()
    achieved = flops_per_step * alone_ips / B
    print(f"preset={args.preset} batch={B} tokens={cfg.model.grid ** 2 + 1} threads={torch.get_num_threads()} "
          f"data.num_workers={cfg.data.num_workers}{' compiled' if cfg.pretrain.compile else ''}")
    print(f"model FLOPs per step      {flops_per_step / 1e9:.2f} GFLOP")
    print(f"images/s step alone       {alone_ips:.1f}   (90th percentile of {len(alone)} windows of {WINDOW} steps; "
          f"best {max(alone):.0f}, median {pct(alone, 0.5):.0f})")
    print(f"images/s real loop        {loop_ips:.1f}   (90th percentile of {len(loop)} windows; "
          f"best {max(loop):.0f}, median {pct(loop, 0.5):.0f})")
    print(f"pipeline ratio            {loop_ips / alone_ips:.3f}   (of the best windows {max(loop) / max(alone):.3f}, "
          f"of the medians {pct(loop, 0.5) / pct(alone, 0.5):.3f})")
    print(f"real loop, paired         {pct(loop_pairs, 0.5):.3f}   (median of {len(loop_pairs)} windows of pretrain(), each over "
          f"the step alone's windows on either side; quartiles {pct(loop_pairs, 0.25):.3f}-{pct(loop_pairs, 0.75):.3f})")
    print(f"paired ratio              {pct(pairs, 0.5):.3f}   (median of {len(pairs)} adjacent pairs of windows, fed / alone; "
          f"quartiles {pct(pairs, 0.25):.3f}-{pct(pairs, 0.75):.3f})")
    print(f"data of one batch         {data_ms:.1f} ms (views + masks, in the step's process), "
          f"step {1000 * B / alone_ips:.0f} ms")
    print(f"achieved FLOP/s           {achieved / 1e9:.1f} GFLOP/s")
    print(f"matmul FLOP/s (2048^2)    {peak / 1e9:.1f} GFLOP/s")
    print(f"MFU                       {achieved / peak:.3f}")
    if args.compare_channels:
        one, three = [], []
        for _ in range(args.rounds):
            one += paired(args.windows)
            three += paired(args.windows, written_out=True)
        print(f"paired, views of 1 / 3 ch {pct(one, 0.5):.3f} / {pct(three, 0.5):.3f}   (medians of {len(one)} pairs each, "
              f"alternating rounds; quartiles {pct(one, 0.25):.3f}-{pct(one, 0.75):.3f} / "
              f"{pct(three, 0.25):.3f}-{pct(three, 0.75):.3f})")
    print(f"peak RSS                  {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
