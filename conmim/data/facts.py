"""What the data pre-flight knows of a data config (:class:`DataFacts`), read cheaply: each
split's labels as the loaders would split them (:func:`conmim.data.listing.split_plan`), the class
count, and one decoded image per split or shard, never the images themselves. A reader per source
(:data:`READERS`); a reader may raise :class:`~conmim.config.data_paths.DataMissing`."""
from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

from conmim.config.data_paths import FASHION_MNIST_FILES, DataMissing, fashion_mnist_root, idx_path
from conmim.config.experiment import DataConfig
from conmim.data.listing import IMAGE_EXTS, imagefolder_classes, imagefolder_files, read_idx, split_plan

SPLITS = ("train", "val", "test")
SMALL_PARQUET_AREA = 64 * 64  # Parquet images this small are decoded into one array (sources._parquet): one size
SIZE_SAMPLE = 64       # images per Parquet shard whose size is looked at
RGB_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16"}


@dataclass
class DataFacts:
    """What the pre-flight knows of a data config: per split (train, val, test) the labels, as
    the loaders would split them, and a sample image's (width, height, mode)."""
    labels: dict[str, np.ndarray]
    num_classes: int
    source_train: int                 # images of the training source, before validation is held out
    test_is_val: bool                 # the source has no test images: test metrics are on validation
    source_train_classes: set = field(default_factory=set)
    class_names: Optional[list] = None
    sample: dict = field(default_factory=dict)        # split -> (width, height, mode) of one image
    problems: list = field(default_factory=list)      # found while reading: each names data.root

    def name(self, label: int) -> str:
        return f"'{self.class_names[label]}' (label {label})" if self.class_names else f"label {label}"

    def counts(self, split: str) -> Counter:
        return Counter(self.labels[split].tolist())

    def summary(self) -> str:
        sizes = ", ".join(f"{s} {len(self.labels[s])}" for s in SPLITS)
        w, h, mode = self.sample.get("train", (0, 0, "?"))
        return (f"{sizes} images; {len(set(self.labels['train'].tolist()))} classes in train; "
                f"images {w}x{h} {mode}" + (" (no test split: test = validation)" if self.test_is_val else ""))


# ---------------------------------------------------------------------------------------------
# Reading the facts (cheap: labels, listings, one decoded image per split or shard)
# ---------------------------------------------------------------------------------------------
def _sample(item, where: str) -> tuple[tuple, Optional[str]]:
    """(width, height, mode) of an image file or encoded bytes, decoded as the loaders do; or a
    problem when it cannot be."""
    from PIL import Image
    try:
        im = Image.open(io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item)
        im.convert("RGB")  # what the loaders do: refuses what cannot become RGB
    except Exception as e:  # noqa: BLE001 - any decoder error is the data's
        return (0, 0, "?"), f"data.root: {where} is not an image the loaders can decode ({type(e).__name__}: {e})"
    w, h = im.size
    if w < 1 or h < 1:
        return (w, h, im.mode), f"data.root: {where} is {w}x{h} pixels; it cannot be cropped"
    return (w, h, im.mode), None


# A reader: DataConfig -> (labels of the source's train and test images, class count, split ->
# (width, height, mode) of a sample, problems, class names or None).
def _fashion_mnist(dcfg) -> tuple:
    root = fashion_mnist_root(dcfg)
    labels, sample = {}, {}
    for split, (img, lab) in FASHION_MNIST_FILES.items():
        labels[split] = read_idx(idx_path(root, lab))[1].astype(np.int64)
        shape, _ = read_idx(idx_path(root, img), header_only=True)
        sample[split] = (shape[2], shape[1], "L")
    return labels, 10, sample, [], None


def _imagefolder(dcfg) -> tuple:
    root = Path(dcfg.root)
    classes = imagefolder_classes(root)
    labels, sample, problems = {}, {}, []
    listed = {f: imagefolder_files(root, f, classes) for f in ("train", "val", "test")}
    # the loader's choice: val/ when it has images, else test/ (sources._imagefolder)
    test_dir = "val" if listed["val"] and len(listed["val"][1]) or not listed["test"] else "test"
    for split, folder in (("train", "train"), ("test", test_dir)):
        files, labels[split] = listed[folder] if listed[folder] is not None else ([], np.zeros(0, dtype=np.int64))
        if files:
            sample[split], problem = _sample(files[0], f"{files[0]}")
            if problem:
                problems.append(problem)
    base = root / test_dir
    if base.is_dir():
        unknown = sorted(set(imagefolder_classes(root, test_dir)) - set(classes))
        loose = sorted(f.name for f in base.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
        if unknown:
            problems.append(f"data.root: {base} has class folders that {root / 'train'} lacks ({few(unknown)}); their "
                            f"images would be left out. Every class of {test_dir}/ needs a folder in train/")
        if loose and not len(labels["test"]):
            problems.append(f"data.root: {base} holds {len(loose)} images directly ({few(loose)}), not in "
                            f"{test_dir}/<class>/ folders; the loaders find none of them. Put each in its class folder "
                            f"(for ImageNet: python cluster/imagenet_parquet.py val-layout)")
    return labels, len(classes), sample, problems, classes


def _parquet(dcfg) -> tuple:
    import pyarrow.parquet as pq
    from conmim.data.sources import parquet_files  # (the one place that lists shards; imports torch)
    fs, files = parquet_files(str(dcfg.root))
    labels, splits, sample, problems, sizes = [], [], {}, [], {}
    for f in files:
        cols = set(pq.read_schema(f, filesystem=fs).names)
        if not {"image", "label"} <= cols:
            raise DataMissing(f"data.root: parquet '{f}' needs columns image (bytes) and label (int); it has {sorted(cols)}.")
        table = pq.read_table(f, filesystem=fs, columns=[c for c in ("label", "split") if c in cols])
        labels += table.column("label").to_pylist()
        split = table.column("split").to_pylist() if "split" in cols else ["train"] * table.num_rows
        splits += split
        with fs.open_input_file(f) as handle:
            first = next(pq.ParquetFile(handle).iter_batches(batch_size=SIZE_SAMPLE, columns=["image"]), None)
        for k, item in enumerate(first.column(0).to_pylist() if first is not None else []):
            got, problem = _sample(item, f"row {k} of {f}")
            if problem:
                problems.append(problem)
                break
            sizes.setdefault(got[:2], f"row {k} of {f}")
            sample.setdefault(split[k] if split[k] in ("train", "test") else "train", got)
    if len(sizes) > 1 and min(w * h for w, h in sizes) <= SMALL_PARQUET_AREA:
        shown = "; ".join(f"{w}x{h} ({where})" for (w, h), where in list(sizes.items())[:3])
        problems.append(f"data.root: small images (up to {SMALL_PARQUET_AREA} pixels) are batched as one array, so "
                        f"they must share one size, but this Parquet data has {len(sizes)} sizes: {shown}. Resize "
                        f"them to one size when writing the shards")
    labels = np.asarray(labels, dtype=np.int64)
    splits = np.asarray(splits)
    by_split = {s: labels[splits == s] for s in ("train", "test")}
    return by_split, int(labels.max()) + 1 if len(labels) else 0, sample, problems, None


def few(items: list) -> str:
    return ", ".join(map(str, items[:3])) + (f" and {len(items) - 3} more" if len(items) > 3 else "")


READERS = {"fashion-mnist": _fashion_mnist, "imagefolder": _imagefolder, "parquet": _parquet}


def read_facts(dcfg: DataConfig) -> DataFacts:
    """The facts of ``dcfg`` (read once per distinct data config in a process)."""
    return _read_facts(json.dumps(dcfg.model_dump(mode="json"), sort_keys=True))


@lru_cache(maxsize=16)
def _read_facts(key: str) -> DataFacts:
    dcfg = DataConfig.model_validate(json.loads(key))
    source, num_classes, sample, problems, names = READERS[dcfg.name](dcfg)
    n_test = len(source.get("test", []))
    plan = split_plan(len(source["train"]), n_test, dcfg)
    labels = {split: source[src][index] for split, (src, index) in plan.items()}
    sample = {"train": sample.get("train"), "val": sample.get("train"),
              "test": sample.get("test") if n_test else sample.get("train")}
    return DataFacts(labels, num_classes, len(source["train"]), not n_test, set(source["train"].tolist()), names,
                     {s: v for s, v in sample.items() if v}, problems)
