"""ConMIM as one module: the online encoder + projector, and the network that encodes the full
view (the target): a :class:`MomentumEncoder` copy, or the online network itself. Its forward
computes the whole denoising contrastive objective."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from conmim.method.heads import EncoderWithProjector
from conmim.method.momentum import MomentumEncoder
from conmim.method.objective import denoising_contrast_loss, target_spread
from conmim.method.vit import MaskedViT


class ConMIM(nn.Module):
    """``target_encoder``: ``"momentum"`` (an EMA copy encodes the full view) or ``"shared"`` (the
    online network does). ``stop_grad=False`` lets the gradient flow through the full-view branch
    (with a momentum target nothing there is optimised, so it changes nothing).

    One ``forward`` computes the whole objective, so DDP sees a single forward per backward even
    when the shared encoder runs twice (masked and full view)."""

    def __init__(self, online: EncoderWithProjector, *, target_encoder: str = "momentum", stop_grad: bool = True,
                 temperature: float = 0.1, dictionary: str = "image", rows: Optional[int] = None):
        super().__init__()
        if target_encoder not in ("momentum", "shared"):
            raise ValueError(f"target_encoder must be 'momentum' or 'shared', not {target_encoder!r}")
        self.online = online
        self.momentum = MomentumEncoder(online) if target_encoder == "momentum" else None
        self.temperature, self.dictionary, self.stop_grad = temperature, dictionary, stop_grad
        self.rows = rows  # masked patches per image when every mask has that many: a fixed-shape loss

    def forward(self, masked_view, full_view, mask, loss_mask):
        """Returns the loss summed over the masked patches (the caller normalises it by the
        global count) and the spread of the targets (the collapse indicator)."""
        q = self.online(masked_view, mask)
        if self.momentum is not None:
            with torch.no_grad():
                k = self.momentum(full_view)
        elif self.stop_grad:
            with torch.no_grad():
                k = self.online(full_view)
        else:
            k = self.online(full_view)  # the key branch is differentiable: the ablation
        loss_sum = denoising_contrast_loss(q, k, loss_mask, self.temperature, self.dictionary, reduction="sum",
                                           rows=self.rows)
        return loss_sum, target_spread(k)

    def update_momentum(self, m: float) -> None:
        if self.momentum is not None:
            self.momentum.update(self.online, m)

    def encoder(self, which: str) -> MaskedViT:
        """The momentum encoder (the reference fine-tunes it) or the online one; without a
        momentum encoder, the online one either way."""
        if which == "momentum" and self.momentum is not None:
            return self.momentum.net.encoder
        return self.online.encoder
