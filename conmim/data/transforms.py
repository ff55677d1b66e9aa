"""The two views of ConMIM, computed for a whole batch at once.

One geometric transform per image (flip, then random resized crop) is shared by both views, so
patch i of one view covers the same pixels as patch i of the other. The *basic* view is only
normalised; the *strong* view adds colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur
(p=0.1) and solarize (p=0.2). The per-image parameters come from :mod:`conmim.rng`, so a view
depends only on (seed, epoch, image index).

Working on batched tensors rather than per-image PIL calls keeps the data path from starving
the model on a 2-core machine. One departure from torchvision: the jitter ops run in the fixed
order brightness, contrast, saturation, hue (torchvision shuffles the order per image).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from conmim.data import rng as crng

CROP_TRIES = 10


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


def resized_crop(x: torch.Tensor, boxes: np.ndarray, flip: np.ndarray, size: int) -> torch.Tensor:
    """Crop each image to its box, flip where asked, resample (bicubic) to size x size."""
    B, _, H, W = x.shape
    b = torch.as_tensor(boxes, dtype=x.dtype, device=x.device)
    top, left, h, w = b.unbind(1)
    sx, sy = w / W, h / H
    cx = (left + w / 2) / W * 2 - 1
    cy = (top + h / 2) / H * 2 - 1
    sign = torch.as_tensor(np.where(flip, -1.0, 1.0), dtype=x.dtype, device=x.device)
    theta = torch.zeros(B, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = sx * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [B, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp_(0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor.view(-1, 1, 1, 1) * x + (1 - factor.view(-1, 1, 1, 1)) * other).clamp_(0, 1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    # RGB -> HSV -> shift H -> RGB, per image shift; the same maths as torchvision's tensor path.
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    cr = maxc - minc
    eqc = cr == 0
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    crd = torch.where(eqc, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    v = maxc
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    mask = i.unsqueeze(1) == torch.arange(6, device=x.device).view(-1, 1, 1)
    a1 = torch.stack((v, q, p, p, t, v), 1)
    a2 = torch.stack((t, v, v, q, p, p), 1)
    a3 = torch.stack((p, p, t, v, v, q), 1)
    a4 = torch.stack((a1, a2, a3), 1)
    return torch.einsum("...ijk,...xijk->...xjk", mask.to(x.dtype), a4)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    # The kernel size comes from the configured sigma range, never from the batch: an image's
    # blur must not depend on which other images share its batch.
    B, C, H, W = x.shape
    radius = int(min(math.ceil(3 * max_sigma), (min(H, W) - 1) // 2))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # [B*C, K]
    y = x.reshape(1, B * C, H, W)
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(B * C, 1, 1, -1), groups=B * C)
    y = F.conv2d(y, k.view(B * C, 1, -1, 1), groups=B * C)
    return y.view(B, C, H, W)


@dataclass
class StrongPerturbation:
    """The strong view's photometric ops, with per-image parameters from uniforms [B, 10]."""
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.1
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.2
    NUM_UNIFORMS = 10

    @classmethod
    def from_config(cls, a) -> "StrongPerturbation":
        return cls(a.jitter_p, a.brightness, a.contrast, a.saturation, a.hue, a.grayscale_p,
                   a.blur_p, tuple(a.blur_sigma), a.solarize_p)

    def __call__(self, x: torch.Tensor, u: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(u, dtype=x.dtype, device=x.device)
        jit = t[:, 0] < self.jitter_p
        if jit.any():
            idx = jit.nonzero().squeeze(1)
            y = x[idx]
            tj = t[idx]
            f = lambda col, s: 1 - s + 2 * s * tj[:, col]  # noqa: E731  factor in [1-s, 1+s]
            if self.brightness:
                y = _blend(y, torch.zeros_like(y), f(1, self.brightness))
            if self.contrast:
                y = _blend(y, _gray(y).mean((1, 2, 3), keepdim=True).expand_as(y), f(2, self.contrast))
            if self.saturation:
                y = _blend(y, _gray(y).expand_as(y), f(3, self.saturation))
            if self.hue:
                y = _adjust_hue(y, (2 * tj[:, 4] - 1) * self.hue)
            x = x.index_copy(0, idx, y)
        gray = t[:, 5] < self.grayscale_p
        if gray.any():
            x = torch.where(gray.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
        blur = t[:, 6] < self.blur_p
        if blur.any():
            idx = blur.nonzero().squeeze(1)
            lo, hi = self.blur_sigma
            x = x.index_copy(0, idx, _gaussian_blur(x[idx], lo + (hi - lo) * t[idx, 7], hi))
        sol = t[:, 8] < self.solarize_p
        if sol.any():
            x = torch.where(sol.view(-1, 1, 1, 1) & (x >= 0.5), 1 - x, x)
        return x


class PerImageCrop:
    """RandomResizedCrop + flip of decoded (PIL) images, one by one in a loader worker, with the
    batched transforms' per-image parameters: what variable-size sources (ImageFolder, Parquet of
    JPEGs) need before their images can be stacked into a batch."""

    def __init__(self, seed: int, epoch: int, size: int, scale, ratio, flip_p: float, stream: int):
        self.seed, self.epoch, self.size = seed, epoch, size
        self.scale, self.ratio, self.flip_p, self.stream = scale, ratio, flip_p, stream

    def __call__(self, imgs, index):
        from PIL import Image
        u = crng.uniforms(self.seed, self.epoch, index, self.stream, 2 * CROP_TRIES + 3)
        out = []
        for im, uu in zip(imgs, u):
            top, left, h, w = crop_boxes(uu[None], im.size[1], im.size[0], self.scale, self.ratio)[0]
            if uu[-1] < self.flip_p:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
                left = im.size[0] - left - w
            out.append(im.resize((self.size, self.size), Image.BICUBIC,
                                 box=(left, top, left + w, top + h)))
        return out


PERTURBATIONS = {
    # mode: (masked/online view, full/target view)
    "asymmetric": ("basic", "strong"),
    "symmetric_basic": ("basic", "basic"),
    "symmetric_strong": ("strong", "strong"),
    "switched": ("strong", "basic"),
}


class Normalize:
    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)


class TwoViewTransform:
    """uint8 images [B, 3, H, W] + their indices -> (masked-view input, full-view input).

    ``geometry=False`` when the loader already applied the crop (variable-size sources such as
    ImageFolder, where cropping must happen per image before batching)."""

    def __init__(self, augment, perturbation: str, size: int, mean, std, seed: int, geometry: bool = True):
        self.a = augment
        self.views = PERTURBATIONS[perturbation]
        self.size, self.seed, self.geometry = size, seed, geometry
        self.strong = StrongPerturbation.from_config(augment)
        self.normalize = Normalize(mean, std)

    def shared_geometry(self, x: torch.Tensor, epoch: int, index) -> torch.Tensor:
        x = x.float().div_(255)
        if not self.geometry:
            return x
        u = crng.uniforms(self.seed, epoch, index, crng.GEOMETRY, 2 * CROP_TRIES + 3)
        boxes = crop_boxes(u, x.shape[2], x.shape[3], self.a.crop_scale, self.a.crop_ratio)
        return resized_crop(x, boxes, u[:, -1] < self.a.flip_p, self.size)

    def __call__(self, x: torch.Tensor, epoch: int, index) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.shared_geometry(x, epoch, index)
        out = []
        for view, (kind, stream) in enumerate(zip(self.views, (crng.STRONG_VIEW, crng.STRONG_VIEW_2))):
            if kind == "strong":
                # symmetric_strong: the two views draw independent strong perturbations.
                s = stream if self.views == ("strong", "strong") else crng.STRONG_VIEW
                v = self.strong(x, crng.uniforms(self.seed, epoch, index, s, StrongPerturbation.NUM_UNIFORMS))
            else:
                v = x
            out.append(self.normalize(v))
        return out[0], out[1]


class EvalTransform:
    """uint8 -> resized (bicubic) and normalised float, no randomness."""

    def __init__(self, size: int, mean, std):
        self.size = size
        self.normalize = Normalize(mean, std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp_(0, 1)
        return self.normalize(x)


class FinetuneTransform:
    """Fine-tuning augmentation: random resized crop + flip from the per-image generator."""

    def __init__(self, size: int, mean, std, seed: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5):
        self.size, self.seed, self.scale, self.ratio, self.flip_p = size, seed, scale, ratio, flip_p
        self.normalize = Normalize(mean, std)

    def __call__(self, x: torch.Tensor, epoch: int, index) -> torch.Tensor:
        x = x.float().div_(255)
        u = crng.uniforms(self.seed, epoch, index, crng.FINETUNE, 2 * CROP_TRIES + 3)
        boxes = crop_boxes(u, x.shape[2], x.shape[3], self.scale, self.ratio)
        return self.normalize(resized_crop(x, boxes, u[:, -1] < self.flip_p, self.size))
