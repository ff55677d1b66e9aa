"""What a source holds and how the loaders split it, without decoding an image and without torch:
the files and labels of an ImageFolder, and the fixed train / val hold-out with ``data.subset``
and ``data.eval_subset``. The loaders (:mod:`.sources`) and the data pre-flight
(:mod:`.preflight`) both use these, so the pre-flight sees the very splits a run would train on."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

SPLIT_SEED = 20230101  # the train/val split never changes with the experiment's seed
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}  # (compared lower-cased)
VAL_FRACTION_CAP = 5   # at most 1/5 of the training source is held out for validation


def imagefolder_classes(root: Path, split: str = "train") -> list[str]:
    base = Path(root) / split
    return sorted(d.name for d in base.iterdir() if d.is_dir()) if base.is_dir() else []


def imagefolder_files(root: Path, split: str, classes: list[str]) -> tuple[list[str], np.ndarray] | None:
    """The image files of ``root/split/<class>/*`` for the training split's ``classes`` (in that
    order, sorted within a class) and their labels; None when ``root/split`` is not a folder."""
    base = Path(root) / split
    if not base.is_dir():
        return None
    files, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((base / c).iterdir()) if (base / c).is_dir() else []:
            if f.suffix.lower() in IMAGE_EXTS:
                files.append(str(f))
                labels.append(i)
    return files, np.asarray(labels, dtype=np.int64)


def held_out(n_full: int, val_size: int) -> int:
    """How many of the ``n_full`` training-source images the validation split gets."""
    return min(val_size, n_full // VAL_FRACTION_CAP)


def split_plan(n_full: int, n_test: int, dcfg) -> dict[str, tuple[str, np.ndarray]]:
    """{'train', 'val', 'test'}: (the source split the images come from, 'train' or 'test'; their
    indices in it). Validation is a fixed shuffle's first ``held_out`` images of the training
    source; ``data.subset`` keeps the first N of the rest, ``data.eval_subset`` the first N of val
    and of test; a source without test images is tested on the validation split."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n_full)
    k = held_out(n_full, dcfg.val_size)
    val, train = perm[:k], perm[k:]
    test = ("test", np.arange(n_test)) if n_test else ("train", val)
    if dcfg.subset:
        train = train[:dcfg.subset]
    if dcfg.eval_subset:
        val = val[:dcfg.eval_subset]
        test = (test[0], test[1][:dcfg.eval_subset])
    return {"train": ("train", train), "val": ("train", val), "test": test}


def read_idx(path: Path, header_only: bool = False) -> tuple[tuple, Optional[np.ndarray]]:
    """An idx file (Fashion-MNIST's format, gzipped or not): its shape, and its uint8 data in that
    shape (None with ``header_only``: the pre-flight needs only an image file's size)."""
    import gzip
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        head = f.read(4)
        shape = tuple(int.from_bytes(f.read(4), "big") for _ in range(head[3]))
        return shape, None if header_only else np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)
