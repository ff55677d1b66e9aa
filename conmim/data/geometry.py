"""The geometry shared by both views: horizontal flip, then a random resized crop (scale and
aspect ranges as torchvision's RandomResizedCrop), with per-image parameters from
:mod:`conmim.data.rng`. Two places apply it: batched on the training device for images of one
size held in memory (:func:`resized_crop`), or per image in a loader worker while decoding
variable-size files (:class:`PerImageCrop`, which can decode a JPEG at reduced size)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from conmim.data import rng as crng

CROP_TRIES = 10
GEOMETRY_UNIFORMS = 2 * CROP_TRIES + 3  # crop tries (area, ratio), top, left, flip


def crop_boxes(u: np.ndarray, H: int, W: int, scale, ratio) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params, vectorised: [B, 2*10+2] uniforms ->
    [B, 4] boxes (top, left, h, w) in pixels, first valid of 10 tries, else centre crop."""
    B = u.shape[0]
    area = H * W
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    tgt = area * (scale[0] + (scale[1] - scale[0]) * u[:, :CROP_TRIES])
    ar = np.exp(log_r[0] + (log_r[1] - log_r[0]) * u[:, CROP_TRIES: 2 * CROP_TRIES])
    w = np.rint(np.sqrt(tgt * ar))
    h = np.rint(np.sqrt(tgt / ar))
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first = np.where(ok.any(1), ok.argmax(1), -1)
    rows = np.arange(B)
    hw = np.stack([h[rows, first], w[rows, first]], 1)
    # Fallback (no valid try): centre crop clamped to the ratio range, as torchvision does.
    in_ratio = W / H
    if in_ratio < ratio[0]:
        fb = (round(W / ratio[0]), W)
    elif in_ratio > ratio[1]:
        fb = (H, round(H * ratio[1]))
    else:
        fb = (H, W)
    hw[first < 0] = fb
    top = np.floor(u[:, 2 * CROP_TRIES] * (H - hw[:, 0] + 1))
    left = np.floor(u[:, 2 * CROP_TRIES + 1] * (W - hw[:, 1] + 1))
    top[first < 0] = (H - fb[0]) // 2
    left[first < 0] = (W - fb[1]) // 2
    return np.stack([top, left, hw[:, 0], hw[:, 1]], 1)


def flip_and_boxes(u: np.ndarray, H: int, W: int, scale, ratio, flip_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the crop box (top, left, h, w) in the flipped image's pixels, and whether to flip."""
    return crop_boxes(u, H, W, scale, ratio), u[:, -1] < flip_p


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image to its box, flip where asked, resample (bicubic) to size x size. ``boxes``
    [B, 4] and ``flip`` [B] may live on any device: on the images' one, nothing waits for the host."""
    B, _, H, W = x.shape
    b = boxes.to(device=x.device, dtype=x.dtype)
    top, left, h, w = b.unbind(1)
    sx, sy = w / W, h / H
    cx = (left + w / 2) / W * 2 - 1
    cy = (top + h / 2) / H * 2 - 1
    sign = 1.0 - 2.0 * flip.to(device=x.device, dtype=x.dtype)
    theta = torch.zeros(B, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = sx * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [B, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp_(0, 1)


class PerImageCrop:
    """RandomResizedCrop + flip of images decoded one by one in a loader worker, with the batched
    path's per-image parameters: what variable-size sources (ImageFolder, Parquet of JPEGs) need
    before their images can be stacked into a batch.

    ``draft``: a JPEG is decoded at 1/2, 1/4 or 1/8 of its size (in the DCT domain, PIL's
    ``Image.draft``) when its crop box still spans at least ``size`` pixels at that scale: the
    crop is resampled down to ``size`` anyway, and decoding fewer pixels is most of the cost."""

    def __init__(self, seed: int, epoch: int, size: int, scale, ratio, flip_p: float, stream: int,
                 draft: bool = False):
        self.seed, self.epoch, self.size = seed, epoch, size
        self.scale, self.ratio, self.flip_p, self.stream, self.draft = scale, ratio, flip_p, stream, draft

    def __call__(self, imgs, index):
        """``imgs``: opened (not yet decoded) PIL images -> uint8 RGB images of size x size."""
        from PIL import Image
        u = crng.uniforms(self.seed, self.epoch, index, self.stream, GEOMETRY_UNIFORMS)
        out = []
        for im, uu in zip(imgs, u):
            W, H = im.size
            (top, left, h, w), = crop_boxes(uu[None], H, W, self.scale, self.ratio)
            if self.draft and im.format == "JPEG":
                reduce = max([r for r in (1, 2, 4, 8) if min(w, h) / r >= self.size] or [1])
                if reduce > 1:  # (PIL picks the largest scale keeping both sides >= the size asked for)
                    im.draft("RGB", (W // reduce, H // reduce))
                    # the box in the reduced image's pixels (its sides are rounded up: clamp to them)
                    fx, fy = im.size[0] / W, im.size[1] / H
                    left, w = min(left * fx, im.size[0]), w * fx
                    top, h = min(top * fy, im.size[1]), h * fy
                    w, h = min(w, im.size[0] - left), min(h, im.size[1] - top)
            im = im.convert("RGB")
            if uu[-1] < self.flip_p:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
                left = im.size[0] - left - w
            out.append(im.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h)))
        return out
