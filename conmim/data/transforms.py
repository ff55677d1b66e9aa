"""The two views of ConMIM, computed for a whole batch at once, and the evaluation and fine-tuning
transforms.

One geometric transform per image (flip, then random resized crop; :mod:`.geometry`) is shared by
both views, so patch i of one view covers the same pixels as patch i of the other. The *basic*
view is only normalised; the *strong* view adds the photometric perturbation (:mod:`.photometric`).
Every per-image parameter comes from :mod:`conmim.data.rng`, so a view depends only on (seed,
epoch, image index), not on the batch, the worker or the device that computes it.

The work is split where it is cheapest: a loader worker draws the parameters (:meth:`TwoViewTransform.params`,
a few numbers per image) next to the uint8 pixels; the training device computes the views from
both (:meth:`TwoViewTransform.views`), with no data-dependent shape and nothing read back.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from conmim.data import rng as crng
from conmim.data.constants import like
from conmim.data.geometry import GEOMETRY_UNIFORMS, flip_and_boxes, resized_crop
from conmim.data.photometric import StrongPerturbation

PERTURBATIONS = {
    # mode: (masked/online view, full/target view)
    "asymmetric": ("basic", "strong"),
    "symmetric_basic": ("basic", "basic"),
    "symmetric_strong": ("strong", "strong"),
    "switched": ("strong", "basic"),
}


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float in [0, 1]. A grayscale source's batch is one channel broadcast to
    three (stride 0): it stays that one channel until :class:`Normalize` broadcasts it back, for a
    third of the work. Every op in between acts per channel or mixes channels that are equal, so the
    result is the same (bit for bit on the CPU: ``test_a_grayscale_batch_is_computed_on_its_one_channel``)."""
    if x.shape[1] > 1 and x.stride(1) == 0:
        x = x[:, :1]
    return x.float().div_(255)


class Normalize:
    """(x - mean) / std, as x * (1 / std) - mean / std: one pass over the batch instead of two. A
    one-channel batch (:func:`to_unit`) comes out with as many channels as the mean has."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.scale, self.shift = 1 / self.std, -self.mean / self.std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(like(self.shift, x), x, like(self.scale, x))


class ViewParams(NamedTuple):
    """The per-image parameters of one batch's two views, as CPU tensors a DataLoader pins."""
    boxes: Optional[torch.Tensor]   # [B, 4] crop boxes when the views crop here (images of one size), else None
    flip: Optional[torch.Tensor]    # [B] bool, likewise
    strong: torch.Tensor            # [B, 10] uniforms of the strong view
    strong2: torch.Tensor           # [B, 10] of the second strong view (symmetric_strong draws two)


class TwoViewTransform:
    """uint8 images [B, 3, H, W] + their indices -> (masked-view input, full-view input).

    ``geometry=False`` when the loader already applied the crop (variable-size sources such as
    ImageFolder, where cropping must happen per image before batching)."""

    def __init__(self, augment, perturbation: str, size: int, mean, std, seed: int, geometry: bool = True):
        self.a = augment
        self.kinds = PERTURBATIONS[perturbation]
        self.size, self.seed, self.geometry = size, seed, geometry
        self.strong = StrongPerturbation.from_config(augment)
        self.normalize = Normalize(mean, std)

    def params(self, epoch: int, index, height: int, width: int) -> ViewParams:
        """The draws of images ``index`` of ``epoch`` (stored at height x width): cheap, host-side."""
        boxes = flip = None
        if self.geometry:
            u = crng.uniforms(self.seed, epoch, index, crng.GEOMETRY, GEOMETRY_UNIFORMS)
            b, f = flip_and_boxes(u, height, width, self.a.crop_scale, self.a.crop_ratio, self.a.flip_p)
            boxes, flip = torch.from_numpy(b).float(), torch.from_numpy(f)
        n = StrongPerturbation.NUM_UNIFORMS
        strong = torch.from_numpy(crng.uniforms(self.seed, epoch, index, crng.STRONG_VIEW, n)).float()
        strong2 = torch.from_numpy(crng.uniforms(self.seed, epoch, index, crng.STRONG_VIEW_2, n)).float() \
            if self.kinds == ("strong", "strong") else strong
        return ViewParams(boxes, flip, strong, strong2)

    def views(self, x: torch.Tensor, p: ViewParams) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views, on whatever device ``x`` (uint8) and ``p`` are."""
        x = to_unit(x)
        if p.boxes is not None:
            x = resized_crop(x, p.boxes, p.flip, self.size)
        # symmetric_strong: the two views draw independent strong perturbations.
        draws = (p.strong, p.strong2) if self.kinds == ("strong", "strong") else (p.strong, p.strong)
        out = [self.normalize(self.strong(x, u) if kind == "strong" else x) for kind, u in zip(self.kinds, draws)]
        return out[0], out[1]

    def __call__(self, x: torch.Tensor, epoch: int, index) -> tuple[torch.Tensor, torch.Tensor]:
        return self.views(x, self.params(epoch, index, x.shape[2], x.shape[3]))


class EvalTransform:
    """uint8 -> resized (bicubic) and normalised float, no randomness."""

    def __init__(self, size: int, mean, std):
        self.size = size
        self.normalize = Normalize(mean, std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = to_unit(x)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp_(0, 1)
        return self.normalize(x)


class FinetuneTransform:
    """Fine-tuning augmentation: random resized crop + flip from the per-image generator."""

    def __init__(self, size: int, mean, std, seed: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5):
        self.size, self.seed, self.scale, self.ratio, self.flip_p = size, seed, scale, ratio, flip_p
        self.normalize = Normalize(mean, std)

    def __call__(self, x: torch.Tensor, epoch: int, index) -> torch.Tensor:
        x = to_unit(x)
        u = crng.uniforms(self.seed, epoch, index, crng.FINETUNE, GEOMETRY_UNIFORMS)
        boxes, flip = flip_and_boxes(u, x.shape[2], x.shape[3], self.scale, self.ratio, self.flip_p)
        return self.normalize(resized_crop(x, torch.from_numpy(boxes), torch.from_numpy(flip), self.size))
