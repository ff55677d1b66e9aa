"""The momentum encoder: an EMA copy of a network ("asymmetric model progress rates")."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class MomentumEncoder(nn.Module):
    """An exact copy of a network whose parameters follow an EMA of the original's.

    ``update`` does theta_k <- m * theta_k + (1 - m) * theta_q over parameters only (buffers are
    the copy's own: its BatchNorm layers run in training mode), as one fused ``_foreach_lerp_``."""

    def __init__(self, online: nn.Module):
        super().__init__()
        self.net = copy.deepcopy(online)
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)

    @torch.no_grad()
    def update(self, online: nn.Module, m: float) -> None:
        k = [p for p in self.net.parameters()]
        q = [p.detach() for p in online.parameters()]
        torch._foreach_lerp_(k, q, 1.0 - m)
