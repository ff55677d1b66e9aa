"""The denoising contrastive loss: a patch-level InfoNCE where each masked patch must pick out
its own full-image feature among the patches of its dictionary."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def denoising_contrast_loss(online: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                            temperature: float = 0.1, dictionary: str = "image",
                            reduction: str = "mean", rows: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy over masked patches.

    online, target: projector outputs [B, P, D] (CLS excluded, not normalised).
    mask: bool [B, P], True = masked (a row of the loss).
    dictionary: ``"image"`` - negatives are the other P-1 patches of the same image;
                ``"batch"`` - every patch of every image in ``target`` (on this worker).
    reduction: ``"mean"`` over masked patches, or ``"sum"`` (for averaging across workers).
    rows: the number of masked patches of *every* image, when the masking guarantees one: the
          loss then gathers fixed-size tensors (no data-dependent shape, so no device-to-host
          round-trip per step and nothing that stops ``torch.compile``). None: any masks.
    """
    B, P, _ = online.shape
    dtype = torch.promote_types(online.dtype, torch.float32)  # fp32 at least, even under bf16 autocast
    q = F.normalize(online.to(dtype), dim=-1)
    k = F.normalize(target.to(dtype), dim=-1)
    if rows is None:
        b_idx, p_idx = mask.nonzero(as_tuple=True)
    else:
        # the masked positions of each image, in increasing order (a stable sort puts the Trues first)
        p_idx = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :rows]  # [B, M]
        b_idx = torch.arange(B, device=mask.device).unsqueeze(1).expand(B, rows)
        p_idx, b_idx = p_idx.reshape(-1), b_idx.reshape(-1)
    if dictionary == "image":
        # P x P logits per image are cheap; gathering keys per masked patch would not be.
        logits = torch.bmm(q, k.transpose(1, 2))[b_idx, p_idx] / temperature  # [M, P]
        labels = p_idx
    elif dictionary == "batch":
        logits = q[b_idx, p_idx] @ k.reshape(B * P, -1).t() / temperature  # [M, B*P]
        labels = b_idx * P + p_idx
    else:
        raise ValueError(f"dictionary must be 'image' or 'batch', not {dictionary!r}")
    return F.cross_entropy(logits, labels, reduction=reduction)


def target_spread(target: torch.Tensor) -> torch.Tensor:
    """Collapse indicator: per-dimension std of L2-normalised target features, times sqrt(D).
    About 1 for features spread over the sphere, 0 when every token maps to one point."""
    k = F.normalize(target.detach().float().reshape(-1, target.shape[-1]), dim=-1)
    return k.std(0).mean() * k.shape[-1] ** 0.5
