"""The strong view's photometric perturbation, for a whole batch at once: colour jitter (p=0.8),
grayscale (p=0.2), Gaussian blur (p=0.1), solarize (p=0.2), each image with its own parameters
(uniforms from :mod:`conmim.data.rng`). One departure from torchvision: the jitter ops run in the
fixed order brightness, contrast, saturation, hue (torchvision shuffles the order per image)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from conmim.data.constants import like
from conmim.data.geometry import separable


GRAY = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601 luma, as torchvision
# the triangle waves of HSV -> RGB per channel: clamp(offset + sign * |H - centre|, 0, 1)
HUE_CENTRE, HUE_SIGN, HUE_OFFSET = (torch.tensor(v).view(1, 3, 1, 1)
                                    for v in ((3.0, 2.0, 4.0), (1.0, -1.0, -1.0), (-1.0, 2.0, 2.0)))


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x * like(GRAY, x)).sum(1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor.view(-1, 1, 1, 1) * x + (1 - factor.view(-1, 1, 1, 1)) * other).clamp_(0, 1)


def _select(chosen: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per image, ``y`` where ``chosen`` [B], else ``x``: s y + (1 - s) x with s in {0, 1} is exactly
    one or the other, and on the CPU ~2x cheaper than torch.where over a broadcast bool mask."""
    s = chosen.to(x.dtype).view(-1, 1, 1, 1)
    return s * y + (1 - s) * x


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV -> shift H -> RGB, per image shift: torchvision's maths in fewer passes over the
    batch. H in sixths is (offset of the max channel) + (difference of the other two) / chroma;
    back to RGB, each channel is min + chroma x a triangle wave of H (R: clamp(|H - 3| - 1, 0, 1),
    G: clamp(2 - |H - 2|, 0, 1), B: clamp(2 - |H - 4|, 0, 1)). Which channel holds the max is a 0/1
    weight (ties to R, then G: torchvision's order), not a bool mask: on the CPU, ops on bool
    tensors cost several float ops each."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc, minc = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    chroma = maxc - minc
    is_r = 1 - torch.sign(maxc - r)
    is_g = (1 - is_r) * (1 - torch.sign(maxc - g))
    is_b = 1 - is_r - is_g
    # (grey: chroma 0 and every difference 0, so the hue is 0 as in torchvision)
    h6 = (is_r * (g - b) + is_g * (b - r) + is_b * (r - g)) / chroma.clamp_min(torch.finfo(x.dtype).tiny) \
        + 2 * is_g + 4 * is_b + 6 * shift.view(-1, 1, 1, 1)
    h6 = h6 - 6 * torch.floor(h6 / 6)  # mod 6 (torch.remainder is ~3x slower on the CPU)
    centre, sign, offset = (like(c, x) for c in (HUE_CENTRE, HUE_SIGN, HUE_OFFSET))
    return torch.addcmul(minc, chroma, torch.addcmul(offset, sign, (h6 - centre).abs()).clamp_(0, 1))


def _blur_matrix(kernel: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n, n]: a 1-d convolution with each image's ``kernel`` [B, 2r+1] over n pixels, with the
    reflect padding folded in (F.pad's "reflect": the edge pixel is not repeated)."""
    B, K = kernel.shape
    r = K // 2
    src = (torch.arange(n, device=kernel.device)[:, None] + torch.arange(-r, r + 1, device=kernel.device)).abs()
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src)          # [n, K]
    m = torch.zeros(B, n, n, dtype=kernel.dtype, device=kernel.device)
    return m.scatter_add_(2, src.expand(B, n, K), kernel[:, None, :].expand(B, n, K))


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    # The kernel size comes from the configured sigma range, never from the batch: an image's
    # blur must not depend on which other images share its batch.
    B, C, H, W = x.shape
    radius = int(min(math.ceil(3 * max_sigma), (min(H, W) - 1) // 2))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = k / k.sum(1, keepdim=True)
    # separable, as two matrix products per image: on 28-px images several times cheaper than a
    # grouped convolution of B x C channels
    rows = _blur_matrix(k, H)
    return separable(rows, x, rows if W == H else _blur_matrix(k, W))


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

    def __call__(self, x: torch.Tensor, u) -> torch.Tensor:
        """Every op is computed for the whole batch and kept where the image's draw selects it
        (``_select``): no data-dependent shape, so on a GPU nothing waits for the host. ``x`` with
        one channel stands for a grey batch's three equal ones (:func:`conmim.data.transforms.to_unit`):
        the luma sums broadcast it back to three, as the same sums of the same values."""
        t = torch.as_tensor(u, device=x.device).to(x.dtype)
        f = lambda col, s: 1 - s + 2 * s * t[:, col]  # noqa: E731  factor in [1-s, 1+s]
        y = x
        if self.brightness:  # (a blend with black)
            y = (f(1, self.brightness).view(-1, 1, 1, 1) * y).clamp_(0, 1)
        if self.contrast:
            # (towards the mean grey level: the luma weights of the channel means)
            y = _blend(y, (y.mean((2, 3), keepdim=True) * like(GRAY, y)).sum(1, keepdim=True), f(2, self.contrast))
        if self.saturation:
            y = _blend(y, _gray(y), f(3, self.saturation))
        if self.hue and x.shape[1] > 1:  # (a grey image's hue shift is the identity, exactly: chroma 0)
            y = _adjust_hue(y, (2 * t[:, 4] - 1) * self.hue)
        x = _select(t[:, 0] < self.jitter_p, y, x)
        x = _select(t[:, 5] < self.grayscale_p, _gray(x), x)
        if self.blur_p > 0:
            lo, hi = self.blur_sigma
            # (every image, the chosen kept: blurring only those gave float32 round-off that depended on
            # how many were chosen, so on the worker layout; tests/test_accumulate.py caught it)
            x = _select(t[:, 6] < self.blur_p, _gaussian_blur(x, lo + (hi - lo) * t[:, 7], hi), x)
        # solarize: 1 - x where x >= 0.5, which is min(x, 1 - x)
        return _select(t[:, 8] < self.solarize_p, torch.minimum(x, 1 - x), x)
