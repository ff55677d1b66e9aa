import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from conmim.cli import main
from conmim.config import load_config
from conmim.data.sampler import ShardedBatches
from conmim.data.sources import load_splits
from conmim.data.geometry import PerImageCrop
from conmim.data import rng as crng


def test_fashion_mnist_splits_are_fixed_and_disjoint():
    cfg = load_config("tiny", ["data.subset=1000", "data.eval_subset=500"])
    s = load_splits(cfg.data)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (1000, 500, 500)
    full = load_splits(load_config("tiny", ["data.subset=null", "data.val_size=5000"]).data)
    assert len(full["train"]) == 55000 and len(full["val"]) == 5000 and len(full["test"]) == 10000
    x = s["train"].batch(np.arange(4), 28)
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 28, 28)  # grayscale served as 3 channels
    # the held-out split never overlaps training images
    tr = {bytes(v) for v in full["train"].pixels[:, 0].flatten(1).numpy()[:5000]}
    va = {bytes(v) for v in full["val"].pixels[:, 0].flatten(1).numpy()}
    assert len(tr & va) < 5  # (Fashion-MNIST has a few exact duplicates)


def test_sharded_batches_partition_each_global_batch():
    one = [b for _, b in ShardedBatches(100, 20, 0, 1, seed=1, epoch=3)]
    two = [[b for _, b in ShardedBatches(100, 20, r, 2, seed=1, epoch=3)] for r in range(2)]
    for g, a, b in zip(one, *two):
        assert len(a) == len(b) == 10 and np.array_equal(np.concatenate([a, b]), g)
    other_epoch = [b for _, b in ShardedBatches(100, 20, 0, 1, seed=1, epoch=4)]
    assert not np.array_equal(np.concatenate(one), np.concatenate(other_epoch))


def test_parquet_prepare_and_load_roundtrip(tmp_path):
    out = tmp_path / "fm.parquet"
    res = CliRunner().invoke(main, ["data", "prepare", "fashion-mnist", str(out), "--limit", "300"])
    assert res.exit_code == 0, res.output
    cfg = load_config("tiny", ["data.name=parquet", f"data.root={out}", "data.val_size=50"])
    s = load_splits(cfg.data)
    ref = load_splits(load_config("tiny", ["data.subset=null"]).data)
    assert len(s["test"]) == 300 and len(s["train"]) + len(s["val"]) == 300
    assert torch.equal(s["test"].pixels[:10, :1], ref["test"].pixels[:10])  # PNG is lossless
    assert s["test"].mean == ref["test"].mean


def test_imagefolder_decodes_and_crops_per_image(tmp_path):
    ref = load_splits(load_config("tiny", ["data.subset=40"]).data)["train"]
    for split in ("train", "val"):
        for i in range(40):
            d = tmp_path / split / f"class{ref.labels[i]}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ref.pixels[i, 0].numpy()).resize((37, 45)).save(d / f"{i}.png")
    cfg = load_config("tiny", ["data.name=imagefolder", f"data.root={tmp_path}", "data.val_size=5"])
    s = load_splits(cfg.data)
    assert not s["train"].fixed_size and len(s["test"]) == 40
    crop = PerImageCrop(0, 0, 28, (0.3, 1.0), (0.75, 1.33), 0.5, crng.GEOMETRY)
    x = s["train"].batch(np.arange(6), 28, crop=crop)
    assert x.shape == (6, 3, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(x, s["train"].batch(np.arange(6), 28, crop=crop))  # deterministic
    assert s["test"].batch(np.arange(3), 28).shape == (3, 3, 28, 28)  # eval: resize + centre crop


def test_missing_dataset_is_a_clear_exit_2(tmp_path):
    res = CliRunner().invoke(main, ["validate", "tiny", "--set", f"data.root={tmp_path}"])
    assert res.exit_code == 2
    assert "data.root" in res.output and "apt-get install dataset-fashion-mnist" in res.output


def test_reduced_size_jpeg_decoding_is_used_only_where_the_crop_stays_large(tmp_path, monkeypatch):
    """data.decode_draft: a large photo's crop is decoded at 1/2-1/8 size (PIL's DCT scaling) when
    the crop still spans >= 224 px there, and then matches the full decode closely; a 500x375
    image's crops never qualify (they would be upsampled), so they are decoded in full."""
    from PIL import Image as PILImage
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:900, 0:1200]
    img = np.stack([np.sin(xx / 37.0) * 80 + 128, np.cos(yy / 23.0) * 80 + 128, (xx + yy) % 256], -1)
    big = tmp_path / "big.jpg"
    PILImage.fromarray(np.clip(img + g.normal(0, 4, img.shape), 0, 255).astype(np.uint8)).save(big, quality=95)
    small = tmp_path / "small.jpg"
    PILImage.open(big).resize((500, 375)).save(small, quality=95)
    from PIL import JpegImagePlugin
    scales = []
    orig = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: scales.append(size) or orig(self, mode, size))
    for path, expect_draft in ((big, True), (small, False)):
        scales.clear()
        idx = np.arange(16)
        kw = dict(seed=0, epoch=0, size=224, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5, stream=crng.GEOMETRY)
        full = PerImageCrop(**kw, draft=False)([PILImage.open(path) for _ in idx], idx)
        fast = PerImageCrop(**kw, draft=True)([PILImage.open(path) for _ in idx], idx)
        assert bool(scales) == expect_draft, (path, scales)
        diff = np.abs(np.stack([np.asarray(a, np.float32) - np.asarray(b, np.float32) for a, b in zip(full, fast)]))
        assert diff.mean() < 2.0 and all(np.asarray(f).shape == (224, 224, 3) for f in fast), diff.mean()
