"""Networks: a timm ViT that takes a patch mask, the per-token projector, the momentum encoder,
and the fine-tuning classifier."""
from __future__ import annotations

import copy

import timm
import torch
import torch.nn as nn


class MaskedViT(nn.Module):
    """Any timm ViT (``vit_*``/``deit_*``) or BEiT (``beit_*``) by name; masked patch embeddings
    are replaced by one learned mask token *before* the position embedding is added.
    Returns all tokens [B, 1 + P, D] (CLS first), after the encoder's final LayerNorm as the
    reference's pre-training model does.

    ``for_finetune`` builds the classification encoder of the reference's fine-tuning model:
    no final per-token LayerNorm (mean pooling is followed by the classifier's own ``fc_norm``
    instead), and a BEiT with a shared relative position bias gets one table per block, filled
    from the shared one by :meth:`load_pretrained`, so each is decayed with its own block."""

    def __init__(self, mcfg, drop_path: float = 0.0, for_finetune: bool = False):
        super().__init__()
        kw = dict(pretrained=False, num_classes=0, img_size=mcfg.img_size, patch_size=mcfg.patch_size,
                  drop_path_rate=drop_path, global_pool="")  # "": the final norm is `norm`, not `fc_norm`
        for k in ("embed_dim", "depth", "num_heads"):
            if getattr(mcfg, k) is not None:
                kw[k] = getattr(mcfg, k)
        self.is_beit = mcfg.name.startswith(("beit_", "beitv2_"))
        if mcfg.layer_scale_init is not None:
            kw["init_values"] = mcfg.layer_scale_init
        if self.is_beit:
            shared = mcfg.shared_rel_pos_bias
            kw.update(use_shared_rel_pos_bias=shared and not for_finetune, use_rel_pos_bias=shared and for_finetune,
                      use_abs_pos_emb=not shared)
        try:
            self.vit = timm.create_model(mcfg.name, **kw)
        except RuntimeError as e:  # unknown model name
            raise ValueError(f"model.name: {e}") from None
        # parts of the timm model this forward never uses (pooling head): drop them, so that DDP
        # sees no parameter without a gradient
        for name in ("fc_norm", "head", "head_drop", "attn_pool"):
            if isinstance(getattr(self.vit, name, None), nn.Module):
                setattr(self.vit, name, nn.Identity())
        if for_finetune:
            self.vit.norm = nn.Identity()
        self.embed_dim = self.vit.embed_dim
        self.num_patches = self.vit.patch_embed.num_patches
        self.depth = len(self.vit.blocks)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def load_pretrained(self, state: dict) -> None:
        """Load a pre-trained encoder's weights, as the reference's fine-tuning does: a shared
        relative position bias table is copied into every block's own table, and the final
        LayerNorm is dropped when this encoder has none (the classifier normalises after pooling)."""
        state = dict(state)
        shared = state.pop("vit.rel_pos_bias.relative_position_bias_table", None)
        if shared is not None and self.vit.rel_pos_bias is None:
            for i in range(self.depth):
                state[f"vit.blocks.{i}.attn.relative_position_bias_table"] = shared.clone()
            state.pop("vit.rel_pos_bias.relative_position_index", None)
        elif shared is not None:
            state["vit.rel_pos_bias.relative_position_bias_table"] = shared
        if isinstance(self.vit.norm, nn.Identity):
            for k in [k for k in state if k.startswith("vit.norm.")]:
                del state[k]
        self.load_state_dict(state)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        v = self.vit
        x = v.patch_embed(x)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        if self.is_beit:
            x = torch.cat((v.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            if v.pos_embed is not None:
                x = x + v.pos_embed
            x = v.pos_drop(x)
            rel = v.rel_pos_bias() if v.rel_pos_bias is not None else None
            for blk in v.blocks:
                x = blk(x, shared_rel_pos_bias=rel)
        else:
            x = v._pos_embed(x)
            x = v.patch_drop(x)
            x = v.norm_pre(x)
            x = v.blocks(x)
        return v.norm(x)

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: embeddings 0, block i -> i + 1."""
        name = name.removeprefix("vit.")
        if name.startswith(("cls_token", "pos_embed", "patch_embed", "mask_token", "reg_token", "rel_pos_bias")) \
                or name == "mask_token":
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1


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
        stats = torch.cat([xd.sum(0), (xd * xd).sum(0), xd.new_tensor([float(x.shape[0])])])
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


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled`` (bf16 needs no loss scaler)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


class Classifier(nn.Module):
    """Fine-tuning head: mean-pooled patch tokens -> LayerNorm -> Linear (as the reference)."""

    def __init__(self, encoder: MaskedViT, num_classes: int):
        super().__init__()
        self.encoder = encoder  # (its mask_token is unused when classifying; finetune freezes it)
        self.fc_norm = nn.LayerNorm(encoder.embed_dim)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_norm(self.encoder(x)[:, 1:].mean(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0, encoder: MaskedViT | None = None):
    """AdamW groups: no decay for biases, norms and embeddings; lr scale decay^(L - layer)."""
    groups: dict[tuple, dict] = {}
    num_layers = encoder.depth + 1 if encoder is not None else 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith((".bias", "cls_token", "pos_embed", "mask_token"))
        layer = num_layers
        if encoder is not None and name.startswith("encoder."):
            layer = encoder.layer_id(name.removeprefix("encoder."))
        scale = layer_decay ** (num_layers - layer) if encoder is not None else 1.0
        key = (no_decay, layer)
        g = groups.setdefault(key, {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale})
        g["params"].append(p)
    return list(groups.values())
