import math
import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from conmim.cli import main
from conmim.config import load_config
from conmim.data.sampler import ShardedBatches
from conmim.data.sources import load_splits
from conmim.data.geometry import GEOMETRY_UNIFORMS, PerImageCrop, crop_boxes
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
        diff = (torch.stack(full).float() - torch.stack(fast).float()).abs()
        assert diff.mean() < 2.0 and all(f.shape == (3, 224, 224) for f in fast), diff.mean()


def test_per_image_crop_matches_pils_resize(tmp_path):
    """The loader's crop (torch's uint8 antialiased bicubic, the flip applied to the output) gives
    what PIL's flip + ``resize(box=...)`` gave before, up- and downscaled: ~0.01 grey levels apart
    on average."""
    from PIL import Image as PILImage
    g = np.random.default_rng(1)
    yy, xx = np.mgrid[0:375, 0:500]
    img = np.stack([np.sin(xx / 17.0) * 90 + 128, np.cos(yy / 11.0) * 90 + 128, (xx * 3 + yy) % 256], -1)
    path = tmp_path / "a.jpg"
    PILImage.fromarray(np.clip(img + g.normal(0, 6, img.shape), 0, 255).astype(np.uint8)).save(path, quality=95)
    idx = np.arange(24)
    kw = dict(seed=0, epoch=0, size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5, stream=crng.GEOMETRY)
    ours = PerImageCrop(**kw)([PILImage.open(path) for _ in idx], idx)
    u = crng.uniforms(0, 0, idx, crng.GEOMETRY, GEOMETRY_UNIFORMS)
    flips = 0
    for x, uu in zip(ours, u):
        im = PILImage.open(path).convert("RGB")
        (top, left, h, w), = crop_boxes(uu[None], 375, 500, kw["scale"], kw["ratio"])
        if uu[-1] < 0.5:
            im, flips = im.transpose(PILImage.FLIP_LEFT_RIGHT), flips + 1
        ref = torch.from_numpy(np.array(im.resize((224, 224), PILImage.BICUBIC, box=(left, top, left + w, top + h))))
        d = (x.permute(1, 2, 0).float() - ref.float()).abs()
        # (the blue channel wraps 255 -> 0: at those steps bicubic overshoots and the two clamp
        # differently, a few pixels in 10^3)
        assert d.mean() < 0.05 and (d > 2).float().mean() < 2e-3, (float(d.mean()), (h, w))
    assert 0 < flips < len(idx)


def rrc_get_params(u, H, W, scale, ratio):
    """torchvision's ``RandomResizedCrop.get_params``, reading the given uniforms for its draws."""
    area, log_ratio = H * W, (math.log(ratio[0]), math.log(ratio[1]))
    for i in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[i])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[10 + i])
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return int(u[20] * (H - h + 1)), int(u[21] * (W - w + 1)), h, w
    in_ratio = W / H
    if in_ratio < min(ratio):
        w = W
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = H, int(round(H * max(ratio)))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


def test_crop_boxes_are_torchvisions_for_images_of_any_size():
    """One vectorised call for a batch of images of different sizes (a loader worker's batch of
    JPEGs) gives torchvision's boxes image by image, the centre-crop fallback of very wide and very
    tall images included."""
    g = np.random.default_rng(0)
    H = g.integers(20, 900, 400).astype(float)
    W = g.integers(20, 900, 400).astype(float)
    H[:20], W[:20] = 10, 800   # 80:1 wide: no try fits, fallback clamps the ratio
    H[20:40], W[20:40] = 800, 10
    u = g.random((400, GEOMETRY_UNIFORMS))
    for scale in ((0.08, 1.0), (0.9, 1.0)):
        got = crop_boxes(u, H, W, scale, (3 / 4, 4 / 3))
        ref = np.array([rrc_get_params(u[i], int(H[i]), int(W[i]), scale, (3 / 4, 4 / 3)) for i in range(400)])
        assert (got == ref).all()


def test_fashion_mnist_is_found_through_conmim_fashion_mnist(tmp_path, monkeypatch):
    """README: where Debian's package is not installed, $CONMIM_FASHION_MNIST names the folder of
    the four *-ubyte.gz files; data.root, when set, wins; a folder without them is exit-2 material."""
    from pathlib import Path
    from conmim.config.data_paths import FASHION_MNIST_DIR, fashion_mnist_root, missing_data_message
    for f in Path(FASHION_MNIST_DIR).glob("*-ubyte.gz"):
        (tmp_path / f.name).symlink_to(f)
    monkeypatch.setenv("CONMIM_FASHION_MNIST", str(tmp_path))
    cfg = load_config("tiny", ["data.subset=64", "data.eval_subset=64"])
    assert fashion_mnist_root(cfg.data) == tmp_path and missing_data_message(cfg.data) is None
    assert len(load_splits(cfg.data)["train"]) == 64
    monkeypatch.setenv("CONMIM_FASHION_MNIST", str(tmp_path / "empty"))
    assert "Fashion-MNIST not found in " + str(tmp_path / "empty") in missing_data_message(cfg.data)
    assert fashion_mnist_root(cfg.data.model_copy(update={"root": str(tmp_path)})) == tmp_path
