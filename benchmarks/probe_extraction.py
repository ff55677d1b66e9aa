#!/usr/bin/env python
"""Probe feature extraction on 1 rank vs N ranks (gloo, CPU, one thread each): the seconds from the
first batch to every rank holding all features, measured in one run, and their ratio.

    python benchmarks/probe_extraction.py --images 4096 --ranks 2
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rank(rank, world, init, images, out):
    from conmim.config import load_config
    from conmim.data.sources import load_splits
    from conmim.train.build import build_encoder
    from conmim.train.evaluate import extract
    from conmim.train.session import LocalSession, init_process_group
    torch.set_num_threads(1)
    init_process_group("gloo", init, rank, world, 600)
    cfg = load_config("tiny", ["data.num_workers=0", "data.subset=50000"])
    train = load_splits(cfg.data)["train"].take(np.arange(images))
    torch.manual_seed(0)
    enc = build_encoder(cfg)
    session = LocalSession(out, "probe")
    dist.barrier()
    t0 = time.perf_counter()
    f = extract(enc, train, cfg, "cpu", batch_size=256, session=session)
    dist.barrier()
    if rank == 0:
        Path(out, f"seconds-{world}").write_text(f"{time.perf_counter() - t0} {len(f)}")
    dist.destroy_process_group()


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("--images", type=int, default=4096)
    a.add_argument("--ranks", type=int, default=2)
    args = a.parse_args()
    out = tempfile.mkdtemp(prefix="conmim-probe-bench-")
    secs = {}
    for world in (1, args.ranks):
        mp.spawn(_rank, args=(world, f"file://{out}/pg{world}", args.images, out), nprocs=world, join=True)
        s, n = Path(out, f"seconds-{world}").read_text().split()
        secs[world] = float(s)
        print(f"{world} rank(s): {int(n)} images' features in {secs[world]:.2f} s ({int(n) / secs[world]:.0f} images/s)")
    print(f"speed-up with {args.ranks} ranks: {secs[1] / secs[args.ranks]:.2f}x")


if __name__ == "__main__":
    main()
