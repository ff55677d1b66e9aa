"""The CPU side of the pre-training input pipeline at 224², per loader worker, on ImageNet-like JPEGs.

A loader worker (one ``data.num_workers`` process) decodes each JPEG (at reduced size where the
crop allows, ``data.decode_draft``), crops and flips it to 224² uint8, draws the views' parameters
and the mask; the views themselves are made on the GPU. This measures images/s of that work in
one process, beside the things it replaced or avoids (a full-size decode; the crop resampled by
PIL; the views made on the CPU too), and says how many workers a GPU at a given step speed needs.

    python benchmarks/input_pipeline.py [--images 256] [--gpu-images-per-s 1221]
"""
from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def write_jpegs(root: Path, n: int, classes: int = 8, size=(500, 375), part: int = 0, parts: int = 1) -> Path:
    """ImageNet-like JPEGs (500x375 by default, quality 90): smooth shapes, texture and noise.
    ``part`` of ``parts``: every parts-th image from the part-th (to write in parallel)."""
    from PIL import Image, ImageDraw
    g = np.random.default_rng(0 if parts == 1 else (0, part))
    for split, count in (("train", n), ("val", classes)):
        for i in range(part, count, parts):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            yy, xx = np.mgrid[0:size[1], 0:size[0]]
            base = np.stack([np.sin(xx / (20 + 7 * c) + i) * 60 + 120 + 20 * c for c in range(3)], -1)
            im = Image.fromarray(np.clip(base + g.normal(0, 18, base.shape), 0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(im)
            for _ in range(6):
                x0, y0 = g.integers(0, size[0] - 60), g.integers(0, size[1] - 60)
                draw.ellipse([x0, y0, x0 + g.integers(20, size[0] // 2), y0 + g.integers(20, size[1] // 2)],
                             fill=tuple(int(v) for v in g.integers(0, 255, 3)))
            im.save(d / f"{i:05d}.jpg", quality=90)
    return root


def pil_crop(seed, epoch, size, scale, ratio, flip_p, stream):
    """The loader's crop as it was before (for the comparison in one run): PIL's flip and
    ``resize(box=...)`` per image, then to a uint8 tensor."""
    from PIL import Image
    from conmim.data import rng as crng
    from conmim.data.geometry import GEOMETRY_UNIFORMS, crop_boxes

    def crop(imgs, index):
        out = []
        for im, uu in zip(imgs, crng.uniforms(seed, epoch, index, stream, GEOMETRY_UNIFORMS)):
            W, H = im.size
            (top, left, h, w), = crop_boxes(uu[None], H, W, scale, ratio)
            im = im.convert("RGB")
            if uu[-1] < flip_p:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            im = im.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
            out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1))
        return out
    return crop


def per_worker(make, batches) -> float:
    """images/s of ``make`` over ``batches`` in this process (one loader worker's work)."""
    make(*batches[0])  # warm-up: imports, caches
    t = time.perf_counter()
    n = 0
    for ep, index in batches:
        make(ep, index)
        n += len(index)
    return n / (time.perf_counter() - t)


def measure(root: Path, batch: int, views_too: bool = True) -> dict:
    """Per-worker images/s of the loader's work on the ImageFolder ``root`` (best of two passes)."""
    from conmim.config import load_config
    from conmim.data import rng as crng
    from conmim.data.geometry import PerImageCrop
    from conmim.data.masking import masks_for
    from conmim.data.sampler import ShardedBatches
    from conmim.data.sources import load_splits
    from conmim.data.transforms import TwoViewTransform
    from conmim.train.build import mask_generator

    cfg = load_config("vit-b16-imagenet", [f"data.root={root}", "data.val_size=8"])
    train = load_splits(cfg.data)["train"]
    aug, size = cfg.augment, cfg.model.img_size
    tf = TwoViewTransform(aug, cfg.objective.perturbation, size, train.mean, train.std, cfg.seed, geometry=False)
    maskgen = mask_generator(cfg)
    batches = list(ShardedBatches(len(train), batch, 0, 1, cfg.seed, 0))

    def loader_side(draft: bool, views_on_cpu: bool = False, pil: bool = False):
        def make(ep, index):
            crop = PerImageCrop(cfg.seed, ep, size, aug.crop_scale, aug.crop_ratio, aug.flip_p, crng.GEOMETRY, draft) \
                if not pil else pil_crop(cfg.seed, ep, size, aug.crop_scale, aug.crop_ratio, aug.flip_p, crng.GEOMETRY)
            x = train.batch(index, size, crop=crop)
            p = tf.params(ep, index, size, size)
            if views_on_cpu:
                tf.views(x, p)
            return x, p, masks_for(maskgen, cfg.seed, ep, index)
        return make

    def masks_only(ep, index):
        masks_for(maskgen, cfg.seed, ep, index)

    def decode_only(ep, index):  # the floor: reading and decoding the files, nothing else
        from PIL import Image
        for i in index:
            Image.open(io.BytesIO(Path(train.files[i]).read_bytes())).load()

    kinds = {"draft": loader_side(True), "full": loader_side(False), "masks": masks_only}
    if views_too:
        kinds["views_on_cpu"] = loader_side(True, views_on_cpu=True)
        kinds["pil_crop"] = loader_side(False, pil=True)
        kinds["decode"] = decode_only
    rates: dict = {}
    for _ in range(2):  # interleaved, best of two: this machine is noisy
        for name, make in kinds.items():
            rates[name] = max(rates.get(name, 0.0), per_worker(make, batches))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--gpu-images-per-s", type=float, default=1221.0,
                    help="the GPU's pre-training step speed (benchmarks/gpu_step.py; 1221 = ViT-B/16 bf16 on an H200)")
    a = ap.parse_args()
    torch.set_num_threads(1)  # one loader worker = one process on one core

    tmp = Path(tempfile.mkdtemp(prefix="conmim-jpegs-"))
    sets = {"500x375": (500, 375), "1000x750": (1000, 750), "341x256": (341, 256)}
    rates = {name: measure(write_jpegs(tmp / name, a.images, size=wh), a.batch, views_too=name == "500x375")
             for name, wh in sets.items()}
    r = rates["500x375"]
    print(f"{a.images} JPEGs per set -> 224^2 crops, batch {a.batch}, one process, 1 thread (one loader worker)")
    print(f"{'JPEGs':<10} {'draft':>8} {'full':>8} {'draft/full':>10}   images/s per loader worker")
    for name, x in rates.items():
        print(f"{name:<10} {x['draft']:8.1f} {x['full']:8.1f} {x['draft'] / x['full']:10.2f}")
    print(f"500x375, the two views made on the CPU as well (before): {r['views_on_cpu']:.1f} images/s "
          f"(now / before {r['draft'] / r['views_on_cpu']:.1f}x)")
    print(f"500x375, the crop resampled by PIL (before): {r['pil_crop']:.1f} images/s "
          f"(now, draft off / before {r['full'] / r['pil_crop']:.2f}x)")
    print(f"500x375, reading + decoding alone (the floor): {r['decode']:.1f} images/s "
          f"(the loader's work, draft off, is {r['decode'] / r['full']:.2f}x the decoding's time)")
    print(f"block masks alone: {r['masks']:.0f} images/s")
    for name, x in rates.items():
        print(f"workers for a GPU at {a.gpu_images_per_s:.0f} images/s on {name} JPEGs: "
              f"data.num_workers >= {math.ceil(a.gpu_images_per_s / x['draft'])}")


if __name__ == "__main__":
    main()
