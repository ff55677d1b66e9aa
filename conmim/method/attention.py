"""BEiT's attention with its relative position bias computed by FlexAttention (``pretrain.attention:
flex``). The bias is a learned [heads, N, N] table: SDPA's only kernel that takes it (memory-efficient
attention) reads it as a dense mask and writes its gradient per image, and on an H200 it ran at ~40
TFLOP/s, 23 % of the compiled ViT-B step's kernel time for 3 % of its FLOPs (benchmarks/README.md).
FlexAttention adds the table to the scores inside a kernel Inductor writes for it, and sums its
gradient there."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.beit import Attention as BeitAttention


def flex_biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v by FlexAttention. ``bias``: [H, N, N] or [1, H, N, N], shared
    by the batch as BEiT's is (a per-image bias fails the reshape); it gets its gradient through the
    tensor the score modification captures."""
    from torch.nn.attention.flex_attention import flex_attention
    table = bias.reshape(bias.shape[-3:])
    return flex_attention(q, k, v, score_mod=lambda score, b, h, i, j: score + table[h, i, j])


class FlexBiasedAttention(BeitAttention):
    """timm's BEiT attention, the same parameters and state-dict keys, whose biased attention is
    FlexAttention when compiled on a GPU. Anywhere else timm's own forward runs: uncompiled,
    FlexAttention is an unfused reference that builds the full score matrix (the probes run the
    encoder eagerly), and it has no backward on the CPU."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (self.relative_position_bias_table is None and shared_rel_pos_bias is None) \
                or (self.training and self.attn_drop.p) or not self.use_flex(x):
            return super().forward(x, shared_rel_pos_bias)  # (no bias: SDPA's flash kernel already)
        bias = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        B, N, C = x.shape
        qkv_bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)  # (qkv_bias_separate adds the same bias after: equal)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = flex_biased_attention(q, k, v, bias).transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x))

    @staticmethod
    def use_flex(x: torch.Tensor) -> bool:
        return torch.compiler.is_compiling() and x.is_cuda


def use_flex_attention(vit: nn.Module) -> int:
    """Turn every BEiT attention of ``vit`` into :class:`FlexBiasedAttention` in place, keeping its
    parameters, so that a checkpoint loads whichever computes the attention; returns how many."""
    n = 0
    for m in vit.modules():
        if type(m) is BeitAttention:
            m.__class__ = FlexBiasedAttention
            n += 1
    return n
