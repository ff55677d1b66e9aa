#!/usr/bin/env python
"""ImageNet (ILSVRC2012) as Parquet shards that every Ray Train worker reads fast (cluster/README.md, "Data").

Two steps, run once, wherever the raw ImageNet lies (a node of the cluster, or the KubeRay Job of
cluster/kuberay/imagenet-data-job.yaml):

  1. val-layout: the official validation images come as 50 000 files in one folder; put each into
     the folder of its class (its WordNet id), as train/ already is:
       python cluster/imagenet_parquet.py val-layout RAW/val --labels LOC_val_solution.csv
       python cluster/imagenet_parquet.py val-layout RAW/val --devkit ILSVRC2012_devkit_t12.tar.gz
     --labels takes Kaggle's LOC_val_solution.csv (ImageId,PredictionString) or any text file of
     "FILE WNID" lines; --devkit the official development kit (its ground truth and meta.mat).
  2. shards: the ImageFolder RAW/{train,val}/<wnid>/*.JPEG as Parquet shards of encoded images:
       python cluster/imagenet_parquet.py shards RAW /mnt/datasets/imagenet-parquet --workers 16
     Columns image (the file's bytes, not re-encoded), label (index of the class in the sorted
     train/ folder names, as data.name=imagefolder numbers them), split (train | test: ImageNet's
     validation set is conmim's test set, as with imagefolder). Shards are written under a hidden
     temporary name and renamed when complete, so a killed run is continued by running it again
     (finished shards are kept). `_manifest.json` is written first, marked incomplete, with the
     planned shards, and again once all are written, with their sizes; every shard carries the
     run's settings in its metadata. A re-run with other settings, or into a folder holding
     shards of another conversion, is refused: conmim refuses to train on a mixed set
     (conmim/data/manifest.py).

Then train with data.name=parquet data.root=/mnt/datasets/imagenet-parquet (a folder of shards,
or an s3:// / gs:// prefix). This file uses only the standard library, pyarrow and (for
--resize-shorter, --devkit) Pillow and scipy, all in the project's image.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# the file types conmim's imagefolder source reads (conmim/data.py), so both number images alike
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
MANIFEST = "_manifest.json"            # as conmim.data.manifest.MANIFEST reads it
SHARD_METADATA = b"conmim.shard"       # a shard's settings, as conmim.data.manifest.SHARD_METADATA
JPEG_QUALITY = 90                      # of the images --resize-shorter re-encodes


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS


# ---------------------------------------------------------------------------------------------
# 1. val-layout
# ---------------------------------------------------------------------------------------------
def read_labels(path: Path) -> dict[str, str]:
    """{file stem: wnid} from LOC_val_solution.csv or "FILE WNID" lines (comma or whitespace)."""
    out = {}
    with open(path, newline="") as f:
        first = f.readline()
        f.seek(0)
        if first.strip().lower().startswith("imageid,predictionstring"):
            for row in csv.DictReader(f):
                out[Path(row["ImageId"]).stem] = row["PredictionString"].split()[0]
        else:
            for line in f:
                parts = line.replace(",", " ").split()
                if len(parts) >= 2:
                    out[Path(parts[0]).stem] = parts[1]
    if not out:
        raise SystemExit(f"val-layout: no labels read from {path}")
    return out


def read_devkit(path: Path) -> dict[str, str]:
    """{ILSVRC2012_val_%08d: wnid} from the official devkit (ground truth ids + meta.mat)."""
    import scipy.io
    with tarfile.open(path) as tar:
        names = tar.getnames()
        meta = next(n for n in names if n.endswith("data/meta.mat"))
        truth = next(n for n in names if n.endswith("data/ILSVRC2012_validation_ground_truth.txt"))
        synsets = scipy.io.loadmat(io.BytesIO(tar.extractfile(meta).read()), squeeze_me=True)["synsets"]
        ids = [int(x) for x in tar.extractfile(truth).read().decode().split()]
    fields = synsets.dtype.names
    leaves = [s for s in synsets if "num_children" not in fields or int(s["num_children"]) == 0]
    wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
    return {f"ILSVRC2012_val_{i + 1:08d}": wnid[c] for i, c in enumerate(ids)}


def val_layout(val_dir: Path, labels: dict[str, str]) -> int:
    """Move the flat val images into val/<wnid>/; images already in class folders stay. Returns
    the number moved. Refuses (moving nothing) when an image has no label."""
    flat = sorted(p for p in val_dir.iterdir() if _is_image(p))
    missing = [p.name for p in flat if p.stem not in labels]
    if missing:
        raise SystemExit(f"val-layout: {len(missing)} images of {val_dir} have no label (first: {missing[0]}); "
                         "nothing was moved. Is the labels file the one of this validation set?")
    for p in flat:
        d = val_dir / labels[p.stem]
        d.mkdir(exist_ok=True)
        os.replace(p, d / p.name)
    return len(flat)


# ---------------------------------------------------------------------------------------------
# 2. shards
# ---------------------------------------------------------------------------------------------
def scan(root: Path) -> tuple[list[str], list[tuple[str, str, int]]]:
    """(classes, [(split, file, label)]): train/ then val/, classes sorted, files sorted in each
    class -- the order and numbering of conmim's imagefolder source."""
    train = root / "train"
    if not train.is_dir():
        raise SystemExit(f"shards: {root} has no train/ folder (expected {root}/train/<wnid>/*.JPEG)")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    rows = []
    for folder, split in (("train", "train"), ("val", "test")):
        base = root / folder
        if not base.is_dir():
            continue
        stray = sorted(p.name for p in base.iterdir() if _is_image(p))
        if stray:
            raise SystemExit(f"shards: {base} has {len(stray)} images outside class folders (first: {stray[0]}); "
                             f"run 'val-layout' first")
        unknown = sorted(d.name for d in base.iterdir() if d.is_dir() and d.name not in index)
        if unknown:
            raise SystemExit(f"shards: {base} has class folders that train/ lacks: {unknown[:3]}")
        for c in classes:
            if (base / c).is_dir():
                rows += [(split, str(f), index[c]) for f in sorted((base / c).iterdir()) if _is_image(f)]
    return classes, rows


def _encoded(path: str, resize_shorter: int | None) -> bytes:
    raw = Path(path).read_bytes()
    if not resize_shorter:
        return raw
    from PIL import Image
    im = Image.open(io.BytesIO(raw))
    w, h = im.size
    if min(w, h) <= resize_shorter:
        return raw
    s = resize_shorter / min(w, h)
    im = im.convert("RGB").resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _write_shard(job: tuple[str, list[tuple[str, str, int]], dict]) -> tuple[str, int, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    dest, rows, settings = job
    dest = Path(dest)
    if dest.exists():  # a finished shard of this conversion (write_shards checked its settings)
        return dest.name, len(rows), dest.stat().st_size
    images = [_encoded(f, settings["resize_shorter"]) for _, f, _ in rows]
    table = pa.table({"image": pa.array(images, pa.binary()),
                      "label": pa.array([lab for _, _, lab in rows], pa.int64()),
                      "split": pa.array([s for s, _, _ in rows], pa.string())})
    table = table.replace_schema_metadata({SHARD_METADATA: json.dumps(settings, sort_keys=True).encode()})
    tmp = dest.with_name(f".{dest.name}.tmp")
    # JPEG bytes do not compress; the small columns do
    pq.write_table(table, tmp, compression={"image": "NONE", "label": "ZSTD", "split": "ZSTD"},
                   row_group_size=256)
    os.replace(tmp, dest)
    return dest.name, len(rows), dest.stat().st_size


def write_shards(root: Path, out: Path, images_per_shard: int = 1024, workers: int = 1,
                 resize_shorter: int | None = None, log=print) -> dict:
    """Write ``out/{train,test}-NNNNN.parquet`` and ``out/_manifest.json``; returns the manifest."""
    classes, rows = scan(root)
    settings = {"images_per_shard": images_per_shard, "resize_shorter": resize_shorter, "jpeg_quality": JPEG_QUALITY}
    jobs = []
    for split in ("train", "test"):
        part = [r for r in rows if r[0] == split]
        for k, i in enumerate(range(0, len(part), images_per_shard)):
            jobs.append((str(out / f"{split}-{k:05d}.parquet"), part[i: i + images_per_shard], settings))
    planned = {Path(dest).name: len(part) for dest, part, _ in jobs}
    refuse_mixing(out, root, classes, settings, planned)
    out.mkdir(parents=True, exist_ok=True)
    counts = {s: sum(1 for r in rows if r[0] == s) for s in ("train", "test")}
    manifest = {"complete": False, "source": str(root), "classes": len(classes), "images": counts,
                "shards": len(jobs), "settings": settings,
                "images_per_shard": images_per_shard, "resize_shorter": resize_shorter,
                "columns": {"image": "encoded bytes", "label": "int64, sorted train/ class index",
                            "split": "train | test (ImageNet val)"},
                "files": {name: {"rows": n} for name, n in planned.items()},
                "wnids": classes}
    _write_manifest(out, manifest)  # first: a killed run leaves a manifest that says it is unfinished
    done = 0
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for name, n, size in pool.map(_write_shard, jobs, chunksize=1):
            done += n
            manifest["files"][name]["bytes"] = size
            log(f"{name}: {n} images, {size / 2**20:.1f} MiB  ({done}/{len(rows)})")
    manifest["complete"] = True
    _write_manifest(out, manifest)
    return manifest


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)


def refuse_mixing(out: Path, root: Path, classes: list[str], settings: dict, planned: dict[str, int]) -> None:
    """Refuse (SystemExit, nothing written) to add shards to a folder that holds another
    conversion's: other settings, another source or other classes in its manifest, shards it
    would not write, shards stamped with other settings or holding other row counts."""
    if not out.is_dir():
        return
    again = "use an empty folder, or the settings of the shards already there"
    old = None
    if (out / MANIFEST).is_file():
        try:
            old = json.loads((out / MANIFEST).read_text())
        except ValueError:
            raise SystemExit(f"shards: {out / MANIFEST} is unreadable; {again}") from None
        old_settings = old.get("settings") or {k: old[k] for k in ("images_per_shard", "resize_shorter") if k in old}
        differ = sorted(k for k in old_settings if old_settings[k] != settings.get(k))
        if differ:
            raise SystemExit(f"shards: {out} holds shards written with other settings ("
                             + ", ".join(f"{k}={old_settings[k]}, now {settings.get(k)}" for k in differ)
                             + f"); mixing them would make a set conmim refuses; {again}")
        if old.get("source") != str(root) or old.get("wnids", classes) != classes:
            raise SystemExit(f"shards: {out} holds shards of another source ({old.get('source')}, "
                             f"{old.get('classes')} classes; now {root}, {len(classes)}); {again}")
    import pyarrow.parquet as pq
    for f in sorted(out.glob("*.parquet")):
        if f.name not in planned:
            raise SystemExit(f"shards: {out} holds {f.name}, which this conversion would not write (another "
                             f"conversion's shard); {again}")
        meta = pq.read_schema(f).metadata or {}
        stamp = json.loads(meta[SHARD_METADATA]) if SHARD_METADATA in meta else None
        if stamp is None and old is None:
            raise SystemExit(f"shards: {out} holds {f.name} without settings or a manifest: cannot tell whether "
                             f"this conversion wrote it; {again}")
        if stamp is not None and stamp != settings:
            raise SystemExit(f"shards: {f} was written with other settings ({stamp}, now {settings}); {again}")
        if pq.read_metadata(f).num_rows != planned[f.name]:
            raise SystemExit(f"shards: {f} holds {pq.read_metadata(f).num_rows} images, this conversion puts "
                             f"{planned[f.name]} there (the source changed?); {again}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("val-layout", help="move the flat validation images into val/<wnid>/")
    v.add_argument("val_dir", type=Path)
    g = v.add_mutually_exclusive_group(required=True)
    g.add_argument("--labels", type=Path, help="LOC_val_solution.csv or 'FILE WNID' lines")
    g.add_argument("--devkit", type=Path, help="ILSVRC2012_devkit_t12.tar.gz")
    s = sub.add_parser("shards", help="ImageFolder ROOT/{train,val}/<wnid>/* -> Parquet shards in OUT")
    s.add_argument("root", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--images-per-shard", type=int, default=1024, help="~110 MiB per shard for ImageNet (default 1024)")
    s.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing shards")
    s.add_argument("--resize-shorter", type=int, default=None,
                   help="re-encode (JPEG q90) images whose shorter side is longer than this; default: keep the "
                        "original bytes (the reference recipe's input). Smaller shards need less worker memory")
    a = ap.parse_args(argv)
    if a.cmd == "val-layout":
        labels = read_labels(a.labels) if a.labels else read_devkit(a.devkit)
        n = val_layout(a.val_dir, labels)
        print(f"moved {n} images of {a.val_dir} into {len(set(labels.values()))} class folders")
    else:
        m = write_shards(a.root, a.out, a.images_per_shard, a.workers, a.resize_shorter)
        print(f"{a.out}: {m['shards']} shards, {m['images']['train']} train + {m['images']['test']} test images, "
              f"{m['classes']} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
