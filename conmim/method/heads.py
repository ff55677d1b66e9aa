"""The projector on every token (the reference head), with an optional batch norm over all
workers, and an encoder joined to its projector."""
from __future__ import annotations

import torch
import torch.nn as nn

from conmim.method.vit import MaskedViT


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm whose batch statistics cover every worker's batch (torch's SyncBatchNorm is
    CUDA-only under DDP). Statistics are sums in float64 all-reduced with a differentiable
    all-reduce, so one worker with batch B and N workers with B/N compute the same thing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        import torch.distributed as dist
        C = x.shape[1]
        xd = x.double()
        stats = torch.cat([xd.sum(0), (xd * xd).sum(0), xd.new_full((1,), float(x.shape[0]))])
        if dist.is_available() and dist.is_initialized():  # (a one-rank group: the GPU check forces collectives)
            from torch.distributed.nn.functional import all_reduce
            stats = all_reduce(stats)
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C: 2 * C] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            if self.track_running_stats:
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / (n - 1).clamp_min(1)).to(self.running_var.dtype), m)
        y = ((xd - mean) / torch.sqrt(var + self.eps)).to(x.dtype)
        return y * self.weight + self.bias if self.affine else y


class Projector(nn.Module):
    """The reference head on every token: (Linear -> BN -> ReLU) x2 -> Linear -> BN(affine=False).
    ``sync_bn``: batch statistics over all workers (:class:`GlobalBatchNorm1d`)."""

    def __init__(self, dim: int, hidden: int = 4096, out: int = 256, sync_bn: bool = False):
        super().__init__()
        bn = GlobalBatchNorm1d if sync_bn else nn.BatchNorm1d
        self.net = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), bn(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden, bias=False), bn(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, out, bias=False), bn(out, affine=False),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, P, D = tokens.shape
        return self.net(tokens.reshape(B * P, D)).view(B, P, -1)


class EncoderWithProjector(nn.Module):
    """Encoder + projector: patch features [B, P, out] (CLS dropped)."""

    def __init__(self, encoder: MaskedViT, projector: Projector):
        super().__init__()
        self.encoder, self.projector = encoder, projector

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.projector(self.encoder(x, mask)[:, 1:])
