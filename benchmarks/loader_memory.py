"""Loader memory over epochs: the Parquet source's images as one Python ``bytes`` per image (as
before issue 29) against a few Arrow buffers, in memory or memory-mapped (``data.cache_dir``).

Each approach runs as R "ranks" (processes, as Ray Train workers are), each with N forked loader
workers (``data.num_workers``) that make pre-training batches (the real sampler, crop and
DataLoader) for E epochs. After every epoch each rank reads /proc/<pid>/smaps_rollup of itself and
its workers: RSS, PSS (its share of the pages it maps: what adds up to the node's total) and USS
(its private pages). A forked worker starts sharing its rank's pages; reading a Python ``bytes``
writes its reference count, so the page holding each image's header becomes a private copy in
every worker that reads it, and a worker reads new images every epoch. Slices of an Arrow buffer
have no reference count to write.

    python benchmarks/loader_memory.py [--images 20000] [--size 224] [--ranks 2] [--workers 4] [--epochs 6] [--warmup 2]

It then estimates the memory of a node of 8 ranks x 16 workers on ImageNet's train set, and its
last line is ``RSS growth after warm-up: X % per process``: the largest growth of any process's
PSS (its resident memory, shared pages counted by their share) from the end of the warm-up
epochs to the end of the last, with the Arrow buffers in memory (the default).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

METRICS = ("rss", "pss", "anon", "dirty")
APPROACHES = {"bytes": "one Python bytes per image (before)",
              "arrow": "Arrow buffers in memory (default)",
              "mmap": "Arrow IPC memory-mapped (data.cache_dir)"}
IMAGENET_TRAIN = 1_281_167
IMAGENET_TRAIN_BYTES = 140e9  # ILSVRC2012 train JPEGs as the converter keeps them (~110 KB each)


def make_set(out: Path, n: int, size: int) -> Path:
    """A Parquet folder of ``n`` JPEGs (quality 90): Fashion-MNIST upsampled to ``size``² and
    coloured, each image a distinct one (a different crop of the 60k)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from conmim.config import load_config
    from conmim.data.sources import _fashion_mnist
    base = _fashion_mnist(load_config("tiny").data)["train"]
    g = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    per_shard = 2048
    for s, lo in enumerate(range(0, n, per_shard)):
        images, labels = [], []
        for i in range(lo, min(n, lo + per_shard)):
            x = base.pixels[i % len(base), 0].numpy()
            tint = g.uniform(0.5, 1.0, 3)
            im = Image.fromarray((x[..., None] * tint).astype(np.uint8)).resize((size, size), Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            images.append(buf.getvalue())
            labels.append(int(base.labels[i % len(base)]))
        pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64()),
                                 "split": pa.array(["train"] * len(images))}), out / f"train-{s:05d}.parquet")
    return out


def smaps(pid: int) -> dict:
    """From /proc/<pid>/smaps_rollup, in bytes: RSS; PSS; ``anon``: PSS of anonymous memory (the
    share of heap pages, without mapped file pages, which the page cache holds once per node);
    USS (private clean + dirty: file pages only this process maps count too); ``dirty``: private
    dirty pages (those it wrote -- the copies copy-on-write makes)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        k, v = line.split(":", 1)
        fields[k] = int(v.split()[0]) * 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "anon": fields["Pss_Anon"],
            "uss": fields["Private_Clean"] + fields["Private_Dirty"], "dirty": fields["Private_Dirty"]}


def old_source(root: Path):
    """The Parquet source as it was before issue 29: every image a Python bytes object."""
    import pyarrow.parquet as pq
    from conmim.data.sources import IMAGENET_STATS, ImageSet
    images, labels = [], []
    for f in sorted(root.glob("*.parquet")):
        t = pq.read_table(f, columns=["image", "label"])
        images += t.column("image").to_pylist()
        labels += t.column("label").to_pylist()
        del t
    labels = np.asarray(labels, dtype=np.int64)
    return ImageSet(labels, int(labels.max()) + 1, *IMAGENET_STATS, files=images)


def rank(a) -> None:
    """One rank: load the set the chosen way, make E epochs of batches with N workers, print one
    JSON line per epoch with the memory of this process and of each worker."""
    import torch
    from conmim.config.experiment import DataConfig
    from conmim.data import rng as crng
    from conmim.data.geometry import PerImageCrop
    from conmim.data.sampler import EpochsOfBatches, batches
    from conmim.data.sources import ImageSet, _parquet
    import warnings
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than this VM's cores
    torch.set_num_threads(1)
    if a.approach == "bytes":
        train = old_source(Path(a.root))
    else:
        train = _parquet(DataConfig(name="parquet", root=a.root), a.cache_dir if a.approach == "mmap" else None)["train"]
    assert isinstance(train, ImageSet) and not train.fixed_size
    per_epoch = len(train) // a.batch

    def make(ep, index):
        crop = PerImageCrop(0, ep, a.crop, (0.2, 1.0), (3 / 4, 4 / 3), 0.5, crng.GEOMETRY, draft=True)
        return train.batch(index, a.crop, crop=crop).sum()  # the sum: the batch itself is not what is measured

    sampler = EpochsOfBatches(len(train), a.batch * a.ranks, a.rank, a.ranks, 0, 0, a.epochs)
    steps = per_epoch // a.ranks
    # how many distinct images each worker has read by the end of each epoch (batch i goes to
    # worker i % N), counted before the loader starts so that counting costs nothing measured
    items = [index for _, index in sampler]
    seen_by = np.zeros((a.workers, len(train)), dtype=bool)
    seen = []
    for e in range(a.epochs):
        for i in range(e * steps, (e + 1) * steps):
            seen_by[i % a.workers, items[i]] = True
        seen.append(seen_by.sum(1).tolist())
    del items, seen_by
    loader = iter(batches(make, sampler, a.workers))
    workers = [w.pid for w in loader._workers]
    t0 = time.time()
    for e in range(a.epochs):
        for _ in range(steps):
            next(loader)
        print(json.dumps({"epoch": e + 1, "rank": smaps(os.getpid()), "workers": [smaps(p) for p in workers],
                          "seen": seen[e], "seconds": time.time() - t0}), flush=True)
    del loader


def run_approach(a, approach: str, root: Path, cache: Path) -> list[list[dict]]:
    """[rank][epoch] measurements of R ranks started together."""
    args = [sys.executable, __file__, "--rank-of", approach, "--root", str(root), "--cache-dir", str(cache),
            "--ranks", str(a.ranks), "--workers", str(a.workers), "--epochs", str(a.epochs),
            "--batch", str(a.batch), "--crop", str(a.crop)]
    procs = [subprocess.Popen(args + ["--rank", str(r)], stdout=subprocess.PIPE, text=True) for r in range(a.ranks)]
    out = []
    for p in procs:
        text, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"{approach}: a rank failed ({p.returncode})")
        out.append([json.loads(line) for line in text.splitlines() if line.startswith("{")])
    return out


WARMUP = [1]  # epochs of warm-up (--warmup): a worker's heaps (decoder, allocator arenas) settle in its first ~100 batches


def growth(series: list[float]) -> float:
    """% from the end of the warm-up epochs to the end of the last."""
    start = series[WARMUP[0] - 1]
    return 100.0 * (series[-1] - start) / start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--size", type=int, default=224, help="side of the (upsampled) JPEGs")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2, help="epochs of warm-up, not counted in the growth")
    ap.add_argument("--batch", type=int, default=32, help="images per batch and rank")
    ap.add_argument("--crop", type=int, default=32, help="output side (small: the decode is not what is measured)")
    ap.add_argument("--data", type=Path, default=None, help="folder for the set (default: a temporary one)")
    ap.add_argument("--rank-of", choices=list(APPROACHES), help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank_of:
        a.approach = a.rank_of
        return rank(a)

    WARMUP[0] = max(1, min(a.warmup, a.epochs - 1))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = a.data or Path(tmp) / "set"
        if not list(root.glob("*.parquet")):
            make_set(root, a.images, a.size)
        set_bytes = sum(f.stat().st_size for f in root.glob("*.parquet"))
        print(f"set: {a.images} JPEGs {a.size}x{a.size} q90, {set_bytes / 2**20:.1f} MiB of Parquet; "
              f"{a.ranks} ranks x {a.workers} loader workers (forked), {a.epochs} epochs, {os.cpu_count()} cores")
        results = {k: run_approach(a, k, root, Path(tmp) / "cache") for k in APPROACHES}
    print(f"\nper process, MiB at the end of epochs 1..{a.epochs} (worker: the largest of the {a.ranks * a.workers}); "
          f"growth from the end of epoch {WARMUP[0]} (warm-up) to the end of the last")
    summary = {}
    for k, ranks in results.items():
        epochs = len(ranks[0])
        node_pss = [sum(r[e]["rank"]["pss"] + sum(w["pss"] for w in r[e]["workers"]) for r in ranks) for e in range(epochs)]
        worst_worker = {m: max((max(w[m] for w in r[-1]["workers"]) for r in ranks)) for m in METRICS}
        per_proc = {m: max(growth([r[e][who][m] if who == "rank" else r[e]["workers"][i][m] for e in range(epochs)])
                           for r in ranks for who, i in [("rank", 0)] + [("workers", i) for i in range(a.workers)])
                    for m in METRICS}
        # private bytes a worker gains per image it reads for the first time (after warm-up)
        f = WARMUP[0] - 1
        gained = [(r[-1]["workers"][i]["dirty"] - r[f]["workers"][i]["dirty"]) / max(1, r[-1]["seen"][i] - r[f]["seen"][i])
                  for r in ranks for i in range(a.workers)]
        summary[k] = {"per_proc": per_proc, "per_image": float(np.mean(gained)), "node": growth(node_pss),
                      "rank_uss": max(r[-1]["rank"]["uss"] for r in ranks),
                      "worker_dirty": worst_worker["dirty"], "seconds": max(r[-1]["seconds"] for r in ranks)}
        w_uss = [max(max(w["dirty"] for w in r[e]["workers"]) for r in ranks) / 2**20 for e in range(epochs)]
        w_pss = [max(max(w["pss"] for w in r[e]["workers"]) for r in ranks) / 2**20 for e in range(epochs)]
        print(f"  {APPROACHES[k]}:")
        print(f"    worker private dirty {' '.join(f'{v:7.1f}' for v in w_uss)}   growth after warm-up {growth(w_uss):+.1f} %")
        print(f"    worker PSS           {' '.join(f'{v:7.1f}' for v in w_pss)}   growth after warm-up {growth(w_pss):+.1f} %")
        print(f"    node PSS             {' '.join(f'{v / 2**20:7.1f}' for v in node_pss)}   (all {a.ranks} ranks and their workers)")
        print(f"    largest growth of one process after warm-up: RSS {per_proc['rss']:+.1f} %, PSS {per_proc['pss']:+.1f} %,"
              f" PSS of anonymous memory {per_proc['anon']:+.1f} %, private dirty {per_proc['dirty']:+.1f} %; a worker's written memory grows "
              f"{summary[k]['per_image']:.0f} B per image it reads the first time; {summary[k]['seconds']:.0f} s")

    # ImageNet, a node of 8 ranks x 16 workers, after enough epochs that every worker has read every image
    n_ranks, n_workers = 8, 16
    print(f"\nestimate, a node of {n_ranks} ranks x {n_workers} workers on ImageNet train "
          f"({IMAGENET_TRAIN:,} images, {IMAGENET_TRAIN_BYTES / 1e9:.0f} GB of JPEGs):")
    for k in APPROACHES:
        s = summary[k]
        per_worker = IMAGENET_TRAIN * max(0.0, s["per_image"]) + s["worker_dirty"]
        held = IMAGENET_TRAIN_BYTES * (1 if k == "mmap" else n_ranks)  # the images: once (page cache) or per rank
        total = held + n_ranks * n_workers * per_worker
        where = "once, in the page cache" if k == "mmap" else f"in each of the {n_ranks} ranks"
        print(f"  {APPROACHES[k]}: images {held / 1e9:,.0f} GB ({where}) + {n_ranks * n_workers} workers x "
              f"{per_worker / 1e9:.2f} GB = {total / 1e9:,.0f} GB")
    print(f"(per worker: {IMAGENET_TRAIN:,} images x the bytes it wrote per image above + its private dirty memory here;"
          f" wall time {time.time() - t0:.0f} s)")
    for k in APPROACHES:
        s = summary[k]
        print(f"{APPROACHES[k]}: after warm-up, node PSS {s['node']:+.1f} %, the most of one process: "
              f"PSS {s['per_proc']['pss']:+.1f} %, PSS of anonymous memory {s['per_proc']['anon']:+.1f} %, "
              f"private dirty {s['per_proc']['dirty']:+.1f} %")
    print("(memory-mapped: a process's RSS and PSS rise as it maps more pages of the one shared copy in the page "
          "cache -- its share of them -- while its anonymous memory and what it writes stay flat)")
    print(f"RSS growth after warm-up: {summary['arrow']['per_proc']['pss']:.1f} % per process")


if __name__ == "__main__":
    main()
