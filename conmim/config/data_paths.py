"""Where the configured data lives, and what to tell the user when it is not there.

Kept apart from :mod:`conmim.data` and free of torch, so that the CLI checks a config (and
reports a missing dataset) in a fraction of a second, before anything heavy is imported."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataMissing(FileNotFoundError):
    pass


def idx_path(root: Path, name: str) -> Optional[Path]:
    for cand in (root / f"{name}.gz", root / name, root / "FashionMNIST" / "raw" / f"{name}.gz",
                 root / "FashionMNIST" / "raw" / name):
        if cand.exists():
            return cand
    return None


def fashion_mnist_root(dcfg) -> Path:
    return Path(dcfg.root or os.environ.get("CONMIM_FASHION_MNIST", FASHION_MNIST_DIR))


def missing_data_message(dcfg) -> Optional[str]:
    """None when the configured data can be read, else what is missing and how to get it."""
    if dcfg.name == "fashion-mnist":
        root = fashion_mnist_root(dcfg)
        missing = [n for pair in FASHION_MNIST_FILES.values() for n in pair if idx_path(root, n) is None]
        if missing and not dcfg.download:
            return (f"data.root: Fashion-MNIST not found in {root} (missing {missing[0]}.gz). Install it with "
                    f"'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or set data.root to a folder "
                    f"holding the four *-ubyte.gz files, or set data.download=true on a machine with internet.")
        return None
    root = Path(dcfg.root)
    if dcfg.name == "imagefolder":
        if not (root / "train").is_dir():
            return f"data.root: '{root}' has no train/ folder; imagefolder expects root/train/<class>/* and root/val/<class>/*."
        return None
    if "://" in str(dcfg.root):
        return None  # object storage (s3://, gs://): checked when the data is read, with the node's credentials
    if not root.exists():
        return f"data.root: parquet source '{root}' does not exist; write one with 'conmim data prepare fashion-mnist OUT.parquet'."
    return None  # (a folder of shards is checked against its _manifest.json by the pre-flight)
