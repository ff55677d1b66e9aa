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
from conmim.data.constants import like

CROP_TRIES = 10
GEOMETRY_UNIFORMS = 2 * CROP_TRIES + 3  # crop tries (area, ratio), top, left, flip


def crop_boxes(u: np.ndarray, H, W, scale, ratio) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params, vectorised: [B, 2*10+2] uniforms and the images'
    sizes (scalars, or [B] arrays for images of different sizes) -> [B, 4] boxes (top, left, h, w)
    in pixels, first valid of 10 tries, else centre crop."""
    B = u.shape[0]
    H = np.broadcast_to(np.asarray(H, dtype=np.float64), (B,))
    W = np.broadcast_to(np.asarray(W, dtype=np.float64), (B,))
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    tgt = (H * W)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[:, :CROP_TRIES])
    ar = np.exp(log_r[0] + (log_r[1] - log_r[0]) * u[:, CROP_TRIES: 2 * CROP_TRIES])
    w = np.rint(np.sqrt(tgt * ar))
    h = np.rint(np.sqrt(tgt / ar))
    ok = (w > 0) & (h > 0) & (w <= W[:, None]) & (h <= H[:, None])
    first = np.where(ok.any(1), ok.argmax(1), -1)
    rows = np.arange(B)
    hw = np.stack([h[rows, first], w[rows, first]], 1)
    # Fallback (no valid try): centre crop clamped to the ratio range, as torchvision does.
    in_ratio = W / H
    fb_h = np.where(in_ratio > ratio[1], H, np.where(in_ratio < ratio[0], np.rint(W / ratio[0]), H))
    fb_w = np.where(in_ratio > ratio[1], np.rint(H * ratio[1]), W)
    fall = first < 0
    hw[fall] = np.stack([fb_h, fb_w], 1)[fall]
    top = np.floor(u[:, 2 * CROP_TRIES] * (H - hw[:, 0] + 1))
    left = np.floor(u[:, 2 * CROP_TRIES + 1] * (W - hw[:, 1] + 1))
    top[fall] = ((H - fb_h) // 2)[fall]
    left[fall] = ((W - fb_w) // 2)[fall]
    return np.stack([top, left, hw[:, 0], hw[:, 1]], 1)


def flip_and_boxes(u: np.ndarray, H: int, W: int, scale, ratio, flip_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the crop box (top, left, h, w) in the flipped image's pixels, and whether to flip."""
    return crop_boxes(u, H, W, scale, ratio), u[:, -1] < flip_p


def _cubic_weights(A: float = -0.75) -> torch.Tensor:
    """[4, 4]: (1, t, t^2, t^3) @ this = the bicubic kernel's weights (A = -0.75, PyTorch's and
    PIL's) of the four taps floor(x) - 1 .. floor(x) + 2 of a point at fraction t past floor(x)."""
    T = np.polynomial.Polynomial([0.0, 1.0])
    near = lambda d: (A + 2) * d ** 3 - (A + 3) * d ** 2 + 1              # noqa: E731  |d| <= 1
    far = lambda d: A * d ** 3 - 5 * A * d ** 2 + 8 * A * d - 4 * A       # noqa: E731  1 < |d| < 2
    taps = (far(1 + T), near(T), near(1 - T), far(2 - T))
    return torch.tensor(np.stack([np.pad(p.coef, (0, 4 - len(p.coef))) for p in taps], 1), dtype=torch.float32)


CUBIC = _cubic_weights()


def _resampling_matrix(start: torch.Tensor, length: torch.Tensor, flip, n_in: int, size: int) -> torch.Tensor:
    """[B, size, n_in]: row j holds the bicubic weights of output pixel j over the input pixels,
    for a crop of ``length`` pixels from ``start`` (pixel centres at +0.5, as align_corners=False),
    mirrored where ``flip``, taps beyond the edge clamped to it (grid_sample's border padding)."""
    pos = (torch.arange(size, dtype=start.dtype, device=start.device) + 0.5) / size * length[:, None]
    if flip is not None:
        pos = torch.where(flip[:, None], length[:, None] - pos, pos)
    src = start[:, None] + pos - 0.5
    base = src.floor()
    t = (src - base).unsqueeze(-1)
    weights = torch.cat([torch.ones_like(t), t, t * t, t * t * t], -1) @ like(CUBIC, t)       # [B, size, 4]
    taps = (base.unsqueeze(-1) + torch.arange(-1, 3, dtype=src.dtype, device=src.device)).clamp_(0, n_in - 1)
    return torch.zeros(*src.shape, n_in, dtype=src.dtype, device=src.device).scatter_add_(2, taps.long(), weights)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image to its box, flip where asked, resample (bicubic) to size x size. ``boxes``
    [B, 4] and ``flip`` [B] may live on any device: on the images' one, nothing waits for the host.

    It computes what ``grid_sample(mode="bicubic", padding_mode="border")`` on the crop's affine grid
    does (to float rounding), as two matrix products: the grid has no rotation, so each output row
    reads the same source rows and each output column the same source columns. On 28-px images
    that is ~5x cheaper than grid_sample's 16 gathered taps per pixel."""
    B, _, H, W = x.shape
    top, left, h, w = boxes.to(device=x.device, dtype=x.dtype).unbind(1)
    flip = flip.to(device=x.device, dtype=torch.bool)
    if H == W:  # (both matrices in one go: half the small ops)
        m = _resampling_matrix(torch.cat([top, left]), torch.cat([h, w]), torch.cat([torch.zeros_like(flip), flip]),
                               H, size)
        return separable(m[:B], x, m[B:]).clamp_(0, 1)
    rows = _resampling_matrix(top, h, None, H, size)
    cols = _resampling_matrix(left, w, flip, W, size)
    return separable(rows, x, cols).clamp_(0, 1)


def separable(rows: torch.Tensor, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows [B, S, H] @ x [B, C, H, W] @ cols [B, T, W]^T -> [B, C, S, T]: a separable linear map of
    each image's channels, as two batched matrix products (a broadcast ``@`` over the channels
    took 1-5x longer on the CPU, erratically)."""
    B, C, H, W = x.shape
    if C > 1:
        rows, cols = rows.repeat_interleave(C, 0), cols.repeat_interleave(C, 0)
    return torch.bmm(torch.bmm(rows, x.reshape(B * C, H, W)), cols.transpose(1, 2)).view(B, C, rows.shape[1], -1)


class PerImageCrop:
    """RandomResizedCrop + flip of images decoded one by one in a loader worker, with the batched
    path's per-image parameters: what variable-size sources (ImageFolder, Parquet of JPEGs) need
    before their images can be stacked into a batch.

    The crop is resampled by torch's uint8 bicubic with antialiasing (PIL's filter, to a grey level;
    ``test_per_image_crop_matches_pils_resize``), ~4x faster than PIL's ``resize`` on one core:
    at 500x375 the resampling cost as much as the decoding.

    ``draft``: a JPEG is decoded at 1/2, 1/4 or 1/8 of its size (in the DCT domain, PIL's
    ``Image.draft``) when its crop box still spans at least ``size`` pixels at that scale: the
    crop is resampled down to ``size`` anyway, and decoding fewer pixels is most of the cost."""

    def __init__(self, seed: int, epoch: int, size: int, scale, ratio, flip_p: float, stream: int,
                 draft: bool = False):
        self.seed, self.epoch, self.size = seed, epoch, size
        self.scale, self.ratio, self.flip_p, self.stream, self.draft = scale, ratio, flip_p, stream, draft

    def __call__(self, imgs, index) -> list[torch.Tensor]:
        """``imgs``: opened (not yet decoded) PIL images -> uint8 [3, size, size] tensors."""
        u = crng.uniforms(self.seed, self.epoch, index, self.stream, GEOMETRY_UNIFORMS)
        sizes = [im.size for im in imgs]  # (from the headers: nothing decoded yet)
        widths, heights = np.array(sizes, dtype=np.float64).T
        boxes = crop_boxes(u, heights, widths, self.scale, self.ratio).tolist()
        out = []
        for im, (W, H), (top, left, h, w), flip in zip(imgs, sizes, boxes, u[:, -1] < self.flip_p):
            if flip:  # the box was drawn in the flipped image: the same pixels of the unflipped one
                left = W - left - w
            if self.draft and im.format == "JPEG":
                reduce = max([r for r in (1, 2, 4, 8) if min(w, h) / r >= self.size] or [1])
                if reduce > 1:  # (PIL picks the largest scale keeping both sides >= the size asked for)
                    im.draft("RGB", (W // reduce, H // reduce))
                    # the box in the reduced image's pixels, to the nearest one (the sides are rounded up)
                    fx, fy = im.size[0] / W, im.size[1] / H
                    left, top, w, h = round(left * fx), round(top * fy), round(w * fx), round(h * fy)
                    w, h = min(w, im.size[0] - left), min(h, im.size[1] - top)
            box = (int(left), int(top), int(left + w), int(top + h))
            im = im if im.mode == "RGB" else im.convert("RGB")
            region = torch.from_numpy(np.array(im.crop(box))).permute(2, 0, 1)[None]  # (channels-last: the fast path)
            x = F.interpolate(region, size=(self.size, self.size), mode="bicubic", antialias=True)[0]
            out.append(x.flip(-1) if flip else x)
        return out
