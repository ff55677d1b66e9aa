"""Datasets as labelled image sets with fixed train / val / test splits.

* ``fashion-mnist``: the idx files of Debian's ``dataset-fashion-mnist`` package (or ``root``);
  train/val from the official 60k training images (fixed shuffle, ``val_size`` held out), test =
  the official 10k test images.
* ``imagefolder``: ImageNet layout, ``root/train/<class>/*`` and ``root/val/<class>/*``.
* ``parquet``: rows of (``image``: encoded bytes, ``label``: int, ``split``: train|test), in one
  file or a folder of shards, local or on object storage (``s3://``, ``gs://``). A folder with a
  ``_manifest.json`` is checked against it (:mod:`conmim.data.manifest`). The encoded images are
  held in a few large Arrow buffers (:class:`EncodedImages`), memory-mapped from a node-local
  Arrow IPC copy when ``data.cache_dir`` is set.

Fixed-size sources hand out uint8 batches and the batched transforms crop them; variable-size
sources (ImageFolder, Parquet of JPEGs) crop each image as it is decoded, with the same
per-image parameters (:mod:`conmim.data.rng`).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from conmim.config.experiment import DataConfig
from conmim.config.data_paths import FASHION_MNIST_FILES, DataMissing, fashion_mnist_root, idx_path, missing_data_message
from conmim.data.encoded import EncodedImages
from conmim.data.listing import imagefolder_classes, imagefolder_files, read_idx, split_plan

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
FASHION_MNIST_STATS = ((0.2860,) * 3, (0.3530,) * 3)


@dataclass
class ImageSet:
    """One split. ``pixels`` is a uint8 [N, C, H, W] tensor for fixed-size sources; otherwise
    ``files`` (paths or encoded bytes) are decoded on demand."""
    labels: np.ndarray
    num_classes: int
    mean: tuple
    std: tuple
    pixels: Optional[torch.Tensor] = None
    files: Optional[list] = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def fixed_size(self) -> bool:
        return self.pixels is not None

    def take(self, keep: np.ndarray) -> "ImageSet":
        files = self.files
        if files is not None:
            files = files.take(keep) if isinstance(files, EncodedImages) else [files[i] for i in keep]
        return ImageSet(self.labels[keep], self.num_classes, self.mean, self.std,
                        None if self.pixels is None else self.pixels[torch.as_tensor(keep)], files)

    def batch(self, index, size: int, crop=None) -> torch.Tensor:
        """uint8 [B, 3, ., .]: raw pixels for fixed-size sources; for the others each image is
        decoded and either cropped by ``crop`` (a :class:`conmim.data.geometry.PerImageCrop`, which
        gets the images opened but not yet decoded) or resized + centre-cropped."""
        index = np.asarray(index)
        if self.pixels is not None:
            x = self.pixels[torch.as_tensor(index)]
            return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        imgs = [_open(self.files[i]) for i in index]
        if crop is not None:
            return torch.stack(crop(imgs, index))
        return torch.stack([_pil_to_uint8(_center(im.convert("RGB"), size)) for im in imgs])


def _open(item):
    """The image opened (its header read), not yet decoded. A file is read whole first: PIL's
    decoder reading it in chunks from disk cost ~0.3 ms more per 500x375 JPEG."""
    from PIL import Image
    if isinstance(item, (str, Path)):
        item = Path(item).read_bytes()
    return Image.open(io.BytesIO(item))


def _decode(item):
    return _open(item).convert("RGB")


def _center(im, size: int):
    from PIL import Image
    short = int(round(size / 0.875))
    w, h = im.size
    s = short / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def _pil_to_uint8(im) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
def _fashion_mnist(dcfg) -> dict[str, ImageSet]:
    root = fashion_mnist_root(dcfg)
    if missing_data_message(dcfg):
        if not dcfg.download:
            raise DataMissing(missing_data_message(dcfg))
        import torchvision  # opt-in fallback for machines with internet
        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
        torchvision.datasets.FashionMNIST(str(root), train=False, download=True)
    out = {}
    for split, (img, lab) in FASHION_MNIST_FILES.items():
        x = torch.from_numpy(read_idx(idx_path(root, img))[1].copy()).unsqueeze(1)
        y = read_idx(idx_path(root, lab))[1].astype(np.int64)
        out[split] = ImageSet(y, 10, *FASHION_MNIST_STATS, pixels=x)
    return out


def _imagefolder(dcfg) -> dict[str, ImageSet]:
    root = Path(dcfg.root)
    classes = imagefolder_classes(root)

    def scan(split):
        listed = imagefolder_files(root, split, classes)
        if listed is None:
            return None
        files, labels = listed
        return ImageSet(labels, len(classes), *IMAGENET_STATS, files=files)

    return {"train": scan("train"), "test": scan("val") or scan("test")}


def parquet_files(root: str) -> tuple[object, list[str]]:
    """(pyarrow filesystem, the .parquet files of ``root``): ``root`` is one file or a folder of
    shards (searched recursively, in sorted order so the rows -- and the fixed train/val split --
    do not depend on listing order), a local path or a URI that pyarrow reads (``s3://bucket/prefix``,
    ``gs://...``, ``file:///...``)."""
    import pyarrow.fs as pafs
    if "://" in root:
        fs, path = pafs.FileSystem.from_uri(root)
    else:
        fs, path = pafs.LocalFileSystem(), str(Path(root).resolve())
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return fs, [path]
    if info.type != pafs.FileType.Directory:
        raise DataMissing(f"data.root: parquet source '{root}' does not exist.")
    files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if f.type == pafs.FileType.File and f.path.endswith(".parquet")
                   and not any(part.startswith((".", "_")) for part in f.path[len(path):].split("/")))
    if not files:
        raise DataMissing(f"data.root: parquet folder '{root}' holds no .parquet files.")
    return fs, files


SPLIT_CODES = {"train": 0, "test": 1}  # any other split value is not read


def _shard_table(f: str, fs, columns: list[str], cache_dir: Optional[str]):
    """The shard's (image, label, split) columns as an Arrow table: read into memory, or -- with
    ``cache_dir`` -- memory-mapped from an Arrow IPC copy in that (node-local) folder, written
    once by whichever rank of the node comes first while the others wait on a file lock."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if cache_dir is None:
        return pq.read_table(f, filesystem=fs, columns=columns)
    import fcntl
    import hashlib
    import os
    info = fs.get_file_info(f)
    key = hashlib.sha256(f"{fs.type_name}:{f}:{info.size}:{info.mtime_ns}".encode()).hexdigest()[:24]
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / f"{Path(f).stem}-{key}.arrow"
    if not dest.exists():
        with open(cache / f".{dest.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not dest.exists():
                table = pq.read_table(f, filesystem=fs, columns=columns)
                table = table.cast(pa.schema([pa.field("image", pa.large_binary()) if n == "image" else
                                              table.schema.field(n) for n in table.schema.names]))
                tmp = cache / f".{dest.name}.{os.getpid()}.tmp"
                with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table)
                os.replace(tmp, dest)
                del table
    return pa.ipc.open_file(pa.memory_map(str(dest), "r")).read_all()


def _parquet(dcfg, cache_dir: Optional[str] = None) -> dict[str, ImageSet]:
    """A .parquet file or a folder of shards (checked against its ``_manifest.json``), read one
    shard at a time into :class:`EncodedImages`: a few large Arrow buffers, not one Python
    object per image, so the loader workers' memory stays flat (benchmarks/loader_memory.py)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from conmim.data import manifest as shards_manifest
    root = str(dcfg.root)
    fs, files = parquet_files(root)
    import pyarrow.fs as pafs
    manifest, prefix = None, _fs_path(fs, root).rstrip("/") + "/"
    if fs.get_file_info(_fs_path(fs, root)).type == pafs.FileType.Directory:
        manifest = shards_manifest.check_manifest(root, shards_manifest.list_shards(root))
    images, labels, split, meta = [], [], [], None
    for f in files:
        schema = pq.read_schema(f, filesystem=fs)
        cols = set(schema.names)
        if not {"image", "label"} <= cols:
            raise DataMissing(f"data.root: parquet '{f}' needs columns image (bytes) and label (int); it has {sorted(cols)}.")
        meta = schema.metadata if meta is None else meta
        table = _shard_table(f, fs, [c for c in ("image", "label", "split") if c in cols], cache_dir)
        if manifest is not None:
            shards_manifest.check_shard(root, manifest, f[len(prefix):], table.num_rows, schema.metadata)
        images.append(EncodedImages.from_arrow(table.column("image")))
        labels.append(table.column("label").to_numpy().astype(np.int64))
        if "split" in cols:
            code = np.full(table.num_rows, -1, dtype=np.int8)
            for name, c in SPLIT_CODES.items():
                code[pc.equal(table.column("split"), name).to_numpy(zero_copy_only=False)] = c
        else:
            code = np.zeros(table.num_rows, dtype=np.int8)
        split.append(code)
        del table
    images, labels, split = EncodedImages.concat(images), np.concatenate(labels), np.concatenate(split)
    stats = FASHION_MNIST_STATS if meta and b"conmim.stats" in meta else IMAGENET_STATS
    if manifest is not None:
        counts = {s: int((split == c).sum()) for s, c in SPLIT_CODES.items()}
        n_cls = shards_manifest.check_totals(root, manifest, counts, int(labels.max()))
    else:
        n_cls = int(labels.max()) + 1
    first = _decode(images[0])
    out = {}
    for s, c in SPLIT_CODES.items():
        keep = np.flatnonzero(split == c)
        if first.size[0] * first.size[1] <= 64 * 64 and len(keep):
            # Small images: decode once into memory and batch them like a fixed-size source.
            arr = np.stack([np.asarray(_decode(images[i]), dtype=np.uint8) for i in keep])
            out[s] = ImageSet(labels[keep], n_cls, *stats, pixels=torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous())
        else:
            out[s] = ImageSet(labels[keep], n_cls, *stats, files=images.take(keep))
    return out


def _fs_path(fs, root: str) -> str:
    import pyarrow.fs as pafs
    return pafs.FileSystem.from_uri(root)[1] if "://" in root else str(Path(root).resolve())


def labelled_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of ``per_class`` images of every class (all of a class that has fewer), drawn from
    ``seed`` alone: every trial of a seed fine-tunes on the same labelled images, whatever it
    ablates, so trials paired by seed stay paired."""
    g = np.random.default_rng([seed, 0x1abe1])
    keep = [g.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


@lru_cache(maxsize=4)
def _load(name: str, root: Optional[str], download: bool, cache_dir: Optional[str] = None) -> dict[str, ImageSet]:
    d = DataConfig(name=name, root=root, download=download)
    if name == "parquet":
        return _parquet(d, cache_dir)
    return {"fashion-mnist": _fashion_mnist, "imagefolder": _imagefolder}[name](d)


def load_splits(dcfg) -> dict[str, ImageSet]:
    """{'train', 'val', 'test'} image sets for a :class:`conmim.config.DataConfig`."""
    msg = missing_data_message(dcfg)
    if msg and not dcfg.download:
        raise DataMissing(msg)
    base = _load(dcfg.name, dcfg.root, dcfg.download, dcfg.cache_dir)
    has_test = base.get("test") is not None and len(base["test"])
    plan = split_plan(len(base["train"]), len(base["test"]) if has_test else 0, dcfg)
    return {split: base[source].take(index) for split, (source, index) in plan.items()}


def write_parquet(name: str, out: str, root: Optional[str] = None, limit: Optional[int] = None) -> int:
    """``conmim data prepare``: every image of a built-in dataset as PNG bytes + label + split."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    if name != "fashion-mnist":
        raise ValueError(f"conmim data prepare: unknown dataset '{name}'; allowed: fashion-mnist")
    sets = _fashion_mnist(DataConfig(name=name, root=root))
    images, labels, splits = [], [], []
    for split, s in sets.items():
        n = len(s) if limit is None else min(limit, len(s))
        for img, lab in zip(s.pixels[:n, 0].numpy(), s.labels[:n]):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            images.append(buf.getvalue())
            labels.append(int(lab))
            splits.append(split)
    table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64()),
                      "split": pa.array(splits, pa.string())})
    table = table.replace_schema_metadata({b"conmim.stats": b"fashion-mnist"})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return len(labels)
