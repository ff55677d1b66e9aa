"""The strong view's photometric perturbation, for a whole batch at once: colour jitter (p=0.8),
grayscale (p=0.2), Gaussian blur (p=0.1), solarize (p=0.2), each image with its own parameters
(uniforms from :mod:`conmim.data.rng`). One departure from torchvision: the jitter ops run in the
fixed order brightness, contrast, saturation, hue (torchvision shuffles the order per image)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _each(sel: torch.Tensor) -> torch.Tensor:
    """[B] per-image choice -> broadcastable over [B, C, H, W]."""
    return sel.view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor.view(-1, 1, 1, 1) * x + (1 - factor.view(-1, 1, 1, 1)) * other).clamp_(0, 1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV -> shift H -> RGB, per image shift: torchvision's maths, with the HSV -> RGB step
    in its closed form (channel n of (R, G, B) = (5, 3, 1) is V - V S clamp(min(k, 4 - k), 0, 1),
    k = (n + 6 H) mod 6), which is the same function as the six-way case split at a third of the cost."""
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
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    return maxc.unsqueeze(1) * (1 - s.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0, 1))


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

    def __call__(self, x: torch.Tensor, u) -> torch.Tensor:
        """Every op is computed for the whole batch and kept where the image's draw selects it
        (``torch.where``): no data-dependent shape, so on a GPU nothing waits for the host."""
        t = torch.as_tensor(u, device=x.device).to(x.dtype)
        f = lambda col, s: 1 - s + 2 * s * t[:, col]  # noqa: E731  factor in [1-s, 1+s]
        y = x
        if self.brightness:
            y = _blend(y, torch.zeros_like(y), f(1, self.brightness))
        if self.contrast:
            y = _blend(y, _gray(y).mean((1, 2, 3), keepdim=True).expand_as(y), f(2, self.contrast))
        if self.saturation:
            y = _blend(y, _gray(y).expand_as(y), f(3, self.saturation))
        if self.hue:
            y = _adjust_hue(y, (2 * t[:, 4] - 1) * self.hue)
        x = torch.where(_each(t[:, 0] < self.jitter_p), y, x)
        x = torch.where(_each(t[:, 5] < self.grayscale_p), _gray(x).expand_as(x), x)
        if self.blur_p > 0:
            lo, hi = self.blur_sigma
            x = torch.where(_each(t[:, 6] < self.blur_p), _gaussian_blur(x, lo + (hi - lo) * t[:, 7], hi), x)
        return torch.where(_each(t[:, 8] < self.solarize_p) & (x >= 0.5), 1 - x, x)
