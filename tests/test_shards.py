"""Parquet shards as the data source reads them: the images held in a few Arrow buffers (not one
Python object per image) give the same images, labels, order and batches as the per-image bytes
did; and a set that is not the one its _manifest.json describes -- unfinished, partial, stale,
mixed -- is refused with exit 2, naming what is wrong, as is a conversion into another's folder."""
import json
import shutil
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from conmim.cli import main
from conmim.config import ConfigError, load_config
from conmim.data import manifest as shards_manifest
from conmim.data import rng as crng
from conmim.data.geometry import PerImageCrop
from conmim.data.encoded import EncodedImages
from conmim.data.sources import _load, load_splits
from conftest import REPO

sys.path.insert(0, str(REPO / "cluster"))
import imagenet_parquet as ip  # noqa: E402  (cluster/imagenet_parquet.py)

CLASSES = ["n01440764", "n01443537", "n02102040"]


def _image_folder(root, per_class=4, val_per_class=2):
    """train/<wnid>/*.JPEG and val/<wnid>/*.JPEG of random pixels, of varying sizes (> 64x64, so
    the images stay encoded and are decoded per batch)."""
    g = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c, w in enumerate(CLASSES):
            (root / split / w).mkdir(parents=True)
            for i in range(n):
                size = (70 + 6 * i + c, 66 + 4 * c)
                Image.fromarray(g.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
                    root / split / w / f"{w}_{i}.JPEG", quality=85)
    return root


@pytest.fixture
def shards(tmp_path):
    raw = _image_folder(tmp_path / "raw")
    out = tmp_path / "shards"
    ip.write_shards(raw, out, images_per_shard=5, log=lambda s: None)
    return raw, out


def _splits(root, *sets):
    _load.cache_clear()
    return load_splits(load_config("tiny", ["data.name=parquet", f"data.root={root}", "data.val_size=2", *sets]).data)


def _per_image_bytes(root):
    """The source as it was: every shard's images as a list of Python bytes, in file order."""
    images, labels, split = [], [], []
    for f in sorted(root.glob("*.parquet")):
        t = pq.read_table(f)
        images += t.column("image").to_pylist()
        labels += t.column("label").to_pylist()
        split += t.column("split").to_pylist()
    return images, np.asarray(labels), np.asarray(split)


# ---------------------------------------------------------------------------------------------
# Flat loader memory: the same images in the same order as before
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cached", [False, True], ids=["in-memory", "memory-mapped"])
def test_arrow_buffers_give_the_images_labels_order_and_batches_of_per_image_bytes(shards, tmp_path, cached):
    _, out = shards
    images, labels, split = _per_image_bytes(out)
    sets = _splits(out, *([f"data.cache_dir={tmp_path / 'cache'}"] if cached else []))
    train_val = np.flatnonzero(split == "train")
    test = np.flatnonzero(split == "test")
    assert isinstance(sets["test"].files, EncodedImages)
    assert [bytes(x) for x in sets["test"].files] == [images[i] for i in test]
    assert np.array_equal(sets["test"].labels, labels[test])
    both = sorted([bytes(x) for s in ("train", "val") for x in sets[s].files])
    assert both == sorted(images[i] for i in train_val)  # the fixed train/val split of the same rows
    # a seed's batch: the same crops of the same images as the per-image bytes gave
    ref = sets["train"]
    from conmim.data.sources import ImageSet
    as_bytes = ImageSet(ref.labels, ref.num_classes, ref.mean, ref.std, files=[bytes(x) for x in ref.files])
    crop = PerImageCrop(7, 2, 32, (0.3, 1.0), (0.75, 1.33), 0.5, crng.GEOMETRY)
    index = np.arange(len(ref))[::-1]
    assert np.array_equal(ref.batch(index, 32, crop=crop).numpy(), as_bytes.batch(index, 32, crop=crop).numpy())
    assert np.array_equal(ref.batch(index, 32).numpy(), as_bytes.batch(index, 32).numpy())
    if cached:  # the copy is an Arrow IPC file per shard, memory-mapped (not read into memory)
        assert len(list((tmp_path / "cache").glob("*.arrow"))) == len(list(out.glob("*.parquet")))
        again = _splits(out, f"data.cache_dir={tmp_path / 'cache'}")  # the second rank: maps the same files
        assert [bytes(x) for x in again["test"].files] == [images[i] for i in test]


def test_encoded_images_hold_buffers_not_one_object_per_image(shards):
    _, out = shards
    files = _splits(out)["train"].files
    assert len(files.buffers) <= len(list(out.glob("*.parquet"))) < len(files)
    sub = files.take(np.array([3, 0]))
    assert sub.buffers is files.buffers and bytes(sub[1]) == bytes(files[0])


def test_cache_dir_does_not_change_the_experiment_id():
    from conmim.config.identity import canonical_hash
    a = load_config("tiny", ["data.name=parquet", "data.root=/x.parquet"], check_paths=False)
    b = load_config("tiny", ["data.name=parquet", "data.root=/x.parquet", "data.cache_dir=/nvme/c"], check_paths=False)
    assert canonical_hash(a) == canonical_hash(b)


# ---------------------------------------------------------------------------------------------
# Checked shards: refused when they are not what the manifest says
# ---------------------------------------------------------------------------------------------
def _refused(root, *needles):
    with pytest.raises(ConfigError) as e:
        _splits(root)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    return str(e.value)


def test_a_complete_set_loads_with_the_manifests_classes(shards):
    _, out = shards
    m = json.loads((out / ip.MANIFEST).read_text())
    assert m["complete"] is True and set(m["files"]) == {p.name for p in out.glob("*.parquet")}
    assert shards_manifest.check_manifest(str(out))["classes"] == 3
    m["classes"] = 5  # two classes without images (a set may lack some): the count is the manifest's
    (out / ip.MANIFEST).write_text(json.dumps(m))
    assert _splits(out)["train"].num_classes == 5


def test_an_unfinished_conversion_is_refused(tmp_path):
    raw = _image_folder(tmp_path / "raw")
    (raw / "train" / CLASSES[2] / "broken.JPEG").write_bytes(b"not a jpeg")  # the run dies on it
    out = tmp_path / "shards"
    with pytest.raises(Exception):
        ip.write_shards(raw, out, images_per_shard=5, resize_shorter=60, log=lambda s: None)
    assert list(out.glob("*.parquet"))  # some shards were written
    _refused(out, "unfinished conversion", "not complete")


def test_a_missing_shard_is_refused(shards):
    _, out = shards
    (out / "train-00001.parquet").unlink()
    _refused(out, "incomplete", "train-00001.parquet", "missing")


def test_a_shard_of_another_conversion_is_refused(shards):
    _, out = shards
    shutil.copy(out / "train-00000.parquet", out / "train-00099.parquet")
    _refused(out, "train-00099.parquet", "does not list")


def test_a_stale_shard_is_refused_by_size_rows_and_settings(shards, tmp_path):
    raw, out = shards
    other = tmp_path / "other"
    ip.write_shards(raw, other, images_per_shard=4, log=lambda s: None)
    shutil.copy(other / "train-00000.parquet", out / "train-00000.parquet")  # 4 rows where 5 were
    _refused(out, "stale", "train-00000.parquet", "bytes")
    m = json.loads((out / ip.MANIFEST).read_text())
    for rec in m["files"].values():
        rec.pop("bytes")  # a manifest without sizes: the rows are checked as the shard is read
    (out / ip.MANIFEST).write_text(json.dumps(m))
    _refused(out, "train-00000.parquet", "holds 4 images", "says 5")
    # same rows, other settings stamped in the shard
    t = pq.read_table(other / "train-00001.parquet")
    t = t.replace_schema_metadata({ip.SHARD_METADATA: json.dumps({**m["settings"], "resize_shorter": 64}).encode()})
    pq.write_table(t, out / "train-00000.parquet")
    m["files"]["train-00000.parquet"]["rows"] = t.num_rows
    (out / ip.MANIFEST).write_text(json.dumps(m))
    _refused(out, "train-00000.parquet", "other settings", "resize_shorter=64 (manifest: None)")


def test_counts_and_classes_that_do_not_add_up_are_refused(shards):
    _, out = shards
    m = json.loads((out / ip.MANIFEST).read_text())
    (out / ip.MANIFEST).write_text(json.dumps({**m, "images": {"train": 13, "test": 6}}))
    _refused(out, "12 train images", "says 13")
    (out / ip.MANIFEST).write_text(json.dumps({**m, "classes": 2}))
    _refused(out, "label 2", "2 classes")


def test_an_old_manifest_is_checked_by_its_shard_count(shards):
    _, out = shards
    m = json.loads((out / ip.MANIFEST).read_text())
    old = {k: v for k, v in m.items() if k not in ("files", "settings", "complete")}
    (out / ip.MANIFEST).write_text(json.dumps(old))
    assert len(_splits(out)["test"]) == 6
    (out / "test-00001.parquet").unlink()
    _refused(out, "are 4 files", "says 5 shards")


def test_refused_shards_exit_2_before_anything_starts(shards):
    _, out = shards
    (out / "test-00000.parquet").unlink()
    res = CliRunner().invoke(main, ["validate", "tiny", "--set", "data.name=parquet", "--set", f"data.root={out}"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("conmim: error:") and "Traceback" not in res.output
    assert "test-00000.parquet" in res.output and "missing" in res.output


def test_a_folder_without_manifest_and_a_single_file_are_read_as_they_are(shards, tmp_path):
    _, out = shards
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / ip.MANIFEST).unlink()
    assert shards_manifest.check_manifest(str(bare)) is None
    assert len(_splits(bare)["test"]) == 6
    assert len(_splits(out / "test-00000.parquet")["test"]) == 5


# ---------------------------------------------------------------------------------------------
# The converter refuses to mix its shards with another conversion's
# ---------------------------------------------------------------------------------------------
def _mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


@pytest.mark.parametrize("change,needle", [
    ({"resize_shorter": 60}, "resize_shorter=None, now 60"),
    ({"images_per_shard": 4}, "images_per_shard=5, now 4"),
], ids=["resize", "shard-size"])
def test_the_converter_refuses_other_settings_and_writes_nothing(shards, change, needle):
    raw, out = shards
    before = _mtimes(out)
    with pytest.raises(SystemExit, match="other settings") as e:
        ip.write_shards(raw, out, **{"images_per_shard": 5, **change}, log=lambda s: None)
    assert needle in str(e.value)
    assert _mtimes(out) == before
    ip.write_shards(raw, out, images_per_shard=5, log=lambda s: None)  # the same settings: a no-op resume
    assert _splits(out)["test"].num_classes == 3


def test_the_converter_refuses_unstamped_or_foreign_shards(shards, tmp_path):
    raw, out = shards
    (out / ip.MANIFEST).unlink()
    t = pq.read_table(out / "train-00000.parquet")
    pq.write_table(t.replace_schema_metadata({}), out / "train-00000.parquet")  # as the old converter wrote
    with pytest.raises(SystemExit, match="cannot tell"):
        ip.write_shards(raw, out, images_per_shard=5, log=lambda s: None)
    fresh = tmp_path / "fresh"
    ip.write_shards(raw, fresh, images_per_shard=5, log=lambda s: None)
    shutil.copy(fresh / "train-00000.parquet", fresh / "train-00042.parquet")
    with pytest.raises(SystemExit, match="train-00042.parquet, which this conversion would not write"):
        ip.write_shards(raw, fresh, images_per_shard=5, log=lambda s: None)
    other = tmp_path / "raw2"
    _image_folder(other, per_class=5)
    (fresh / "train-00042.parquet").unlink()
    with pytest.raises(SystemExit, match="another source"):
        ip.write_shards(other, fresh, images_per_shard=5, log=lambda s: None)


def test_the_converter_and_the_reader_agree_on_names():
    assert ip.MANIFEST == shards_manifest.MANIFEST and ip.SHARD_METADATA == shards_manifest.SHARD_METADATA
