"""cluster/imagenet_parquet.py: ImageNet's val layout and the ImageFolder -> Parquet shards
conversion, on a tiny generated JPEG ImageFolder; the shards load through conmim.data.load_splits
(data.name=parquet) as the same images, labels and splits as the ImageFolder itself."""
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conmim.config import load_config
from conmim.data.sources import load_splits
from conftest import REPO

sys.path.insert(0, str(REPO / "cluster"))
import imagenet_parquet as ip  # noqa: E402  (cluster/imagenet_parquet.py)

WNIDS = ["n01440764", "n01443537", "n02102040"]


def _jpeg(path, seed, size):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, format="JPEG")


def _raw_imagenet(tmp_path):
    """train/<wnid>/*.JPEG (5 each) and a flat val/ (3 per class) with Kaggle's label file."""
    root = tmp_path / "raw"
    for c, w in enumerate(WNIDS):
        (root / "train" / w).mkdir(parents=True)
        for i in range(5):
            _jpeg(root / "train" / w / f"{w}_{i}.JPEG", 10 * c + i, (96 + 8 * i, 80))
    (root / "val").mkdir()
    lines = ["ImageId,PredictionString"]
    for k in range(9):
        name = f"ILSVRC2012_val_{k + 1:08d}"
        _jpeg(root / "val" / f"{name}.JPEG", 100 + k, (90, 100 + k))
        lines.append(f"{name},{WNIDS[k % 3]} 1 2 30 40")
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    return root


def _load(name, root):
    return load_splits(load_config("tiny", [f"data.name={name}", f"data.root={root}", "data.val_size=3"]).data)


def test_val_layout_then_shards_load_as_the_same_imagefolder(tmp_path):
    root = _raw_imagenet(tmp_path)
    labels = ip.read_labels(tmp_path / "LOC_val_solution.csv")
    with pytest.raises(SystemExit, match="run 'val-layout' first"):  # flat val/ is refused, not mislabelled
        ip.write_shards(root, tmp_path / "bad")
    assert ip.val_layout(root / "val", labels) == 9
    assert sorted(p.name for p in (root / "val").iterdir()) == WNIDS
    assert ip.val_layout(root / "val", labels) == 0  # idempotent

    out = tmp_path / "imagenet-parquet"
    assert ip.main(["shards", str(root), str(out), "--images-per-shard", "4", "--workers", "2"]) == 0
    shards = sorted(p.name for p in out.glob("*.parquet"))
    assert shards == sorted([f"train-{i:05d}.parquet" for i in range(4)] + [f"test-{i:05d}.parquet" for i in range(3)])
    (out / ".train-00099.parquet.tmp").write_bytes(b"half-written")  # a killed writer's leftover is ignored

    pq_sets, folder_sets = _load("parquet", out), _load("imagefolder", root)
    for split in ("train", "val", "test"):
        a, b = pq_sets[split], folder_sets[split]
        assert len(a) == len(b) > 0 and a.num_classes == b.num_classes == 3
        assert np.array_equal(a.labels, b.labels), split
        assert [bytes(x) for x in a.files] == [open(f, "rb").read() for f in b.files], split  # bytes, not re-encoded
        assert a.mean == b.mean
    assert len(pq_sets["test"]) == 9 and len(pq_sets["train"]) + len(pq_sets["val"]) == 15
    x = pq_sets["train"].batch(np.arange(3), 32)
    assert x.shape == (3, 3, 32, 32)
    # the same folder read through a URI (as s3://bucket/prefix is), and one shard alone
    uri = _load("parquet", out.resolve().as_uri())
    assert np.array_equal(uri["test"].labels, pq_sets["test"].labels)
    assert len(_load("parquet", out / "test-00000.parquet")["test"]) == 4


def test_shards_resume_keeps_finished_shards_and_writes_a_manifest(tmp_path):
    root = _raw_imagenet(tmp_path)
    ip.val_layout(root / "val", ip.read_labels(tmp_path / "LOC_val_solution.csv"))
    out = tmp_path / "out"
    first = ip.write_shards(root, out, images_per_shard=8, log=lambda s: None)
    assert first["images"] == {"train": 15, "test": 9} and first["classes"] == 3 and first["wnids"] == WNIDS
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    (out / "test-00001.parquet").unlink()  # as if the run had been killed before this shard
    ip.write_shards(root, out, images_per_shard=8, log=lambda s: None)
    again = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert set(again) == set(mtimes)
    assert all(again[n] == mtimes[n] for n in mtimes if n != "test-00001.parquet")
    assert (out / ip.MANIFEST).is_file()


def test_resize_shorter_reencodes_only_larger_images(tmp_path):
    root = _raw_imagenet(tmp_path)
    ip.val_layout(root / "val", ip.read_labels(tmp_path / "LOC_val_solution.csv"))
    out = tmp_path / "small"
    ip.write_shards(root, out, resize_shorter=85, log=lambda s: None)
    sets = _load("parquet", out)
    val_sizes = [Image.open(io.BytesIO(f)).size for f in sets["test"].files]
    assert all(w == 85 for w, h in val_sizes) and all(h > 85 for w, h in val_sizes)  # 90 x (100+k) -> 85 x ...
    originals = {open(f, "rb").read() for f in _load("imagefolder", root)["train"].files}
    assert all(bytes(f) in originals for f in sets["train"].files)  # shorter side 80 <= 85: bytes kept as they are


def _devkit(path, n_val=9):
    """An ILSVRC2012 devkit of 3 leaf synsets (+ one inner node): val image k has class 1 + k % 3."""
    import scipy.io
    synsets = np.array([(i + 1, w, 0) for i, w in enumerate(WNIDS)] + [(1001, "n00001740", 3)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    truth = "\n".join(str(1 + k % 3) for k in range(n_val)).encode() + b"\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("ILSVRC2012_devkit_t12/data/meta.mat", buf.getvalue()),
                           ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_val_labels_from_the_devkit_and_missing_labels_are_refused(tmp_path):
    devkit = _devkit(tmp_path / "ILSVRC2012_devkit_t12.tar.gz")
    root = _raw_imagenet(tmp_path)
    assert ip.read_devkit(devkit) == ip.read_labels(tmp_path / "LOC_val_solution.csv")
    (tmp_path / "pairs.txt").write_text("ILSVRC2012_val_00000001.JPEG n01440764\n")
    with pytest.raises(SystemExit, match="8 images .* have no label"):
        ip.val_layout(root / "val", ip.read_labels(tmp_path / "pairs.txt"))
    assert len(list((root / "val").glob("*.JPEG"))) == 9  # nothing was moved


def test_kuberay_data_job_fills_the_volume_from_the_official_imagenet_files(tmp_path):
    """The script of cluster/kuberay/imagenet-data-job.yaml, run as is on a folder standing in for the
    volume, from ImageNet's three official files (train tar of per-class tars, flat val tar, devkit)
    behind a file:// URI standing in for the bucket."""
    import os
    import subprocess
    import yaml
    raw = _raw_imagenet(tmp_path / "made")
    src = tmp_path / "bucket"
    src.mkdir()
    for w in WNIDS:  # the train tar holds one tar per class
        with tarfile.open(tmp_path / f"{w}.tar", "w") as t:
            for f in sorted((raw / "train" / w).iterdir()):
                t.add(f, arcname=f.name)
    with tarfile.open(src / "ILSVRC2012_img_train.tar", "w") as t:
        for w in WNIDS:
            t.add(tmp_path / f"{w}.tar", arcname=f"{w}.tar")
    with tarfile.open(src / "ILSVRC2012_img_val.tar", "w") as t:
        for f in sorted((raw / "val").iterdir()):
            t.add(f, arcname=f.name)
    _devkit(src / "ILSVRC2012_devkit_t12.tar.gz")

    job = yaml.safe_load((REPO / "cluster" / "kuberay" / "imagenet-data-job.yaml").read_text())
    container = job["spec"]["template"]["spec"]["containers"][0]
    script = container["args"][0]
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]},
           "DATASETS": str(tmp_path / "volume"), "IMAGENET_SOURCE": src.resolve().as_uri(), "SHARD_WRITERS": "2",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    r = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "volume" / "imagenet-parquet"
    assert (out / ip.MANIFEST).is_file() and not (tmp_path / "volume" / "raw" / "imagenet").exists()  # raw copy removed
    got, want = _load("parquet", out), _load("imagefolder", _layout(raw, tmp_path))
    for split in ("train", "val", "test"):
        assert np.array_equal(got[split].labels, want[split].labels), split
        assert [bytes(x) for x in got[split].files] == [open(f, "rb").read() for f in want[split].files], split
    again = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "is complete" in again.stdout  # a re-run (or a rescheduled pod) is a no-op


def _layout(raw, tmp_path):
    ip.val_layout(raw / "val", ip.read_labels(tmp_path / "made" / "LOC_val_solution.csv"))
    return raw
