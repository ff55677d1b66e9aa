"""The encoder: any timm ViT or BEiT that takes a patch mask, the fine-tuning classifier on top of
it, and the layer-wise lr decay groups of fine-tuning."""
from __future__ import annotations

from typing import Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from conmim.method.attention import use_flex_attention


class MaskedViT(nn.Module):
    """Any timm ViT (``vit_*``/``deit_*``) or BEiT (``beit_*``) by name; masked patch embeddings
    are replaced by one learned mask token *before* the position embedding is added.
    Returns all tokens [B, 1 + P, D] (CLS first), after the encoder's final LayerNorm as the
    reference's pre-training model does.

    ``for_finetune`` builds the classification encoder of the reference's fine-tuning model:
    no final per-token LayerNorm (mean pooling is followed by the classifier's own ``fc_norm``
    instead), and a BEiT with a shared relative position bias gets one table per block, filled
    from the shared one by :meth:`load_pretrained`, so each is decayed with its own block.

    ``attention="flex"``: a BEiT's biased attention is FlexAttention when compiled on a GPU
    (:mod:`conmim.method.attention`); the same parameters and maths as ``"sdpa"``."""

    def __init__(self, name: str, img_size: int, patch_size: int, *, embed_dim: Optional[int] = None,
                 depth: Optional[int] = None, num_heads: Optional[int] = None, layer_scale_init: Optional[float] = None,
                 shared_rel_pos_bias: bool = False, drop_path: float = 0.0, for_finetune: bool = False,
                 attention: str = "sdpa"):
        super().__init__()
        kw = dict(pretrained=False, num_classes=0, img_size=img_size, patch_size=patch_size,
                  drop_path_rate=drop_path, global_pool="")  # "": the final norm is `norm`, not `fc_norm`
        kw.update({k: v for k, v in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads),
                                     ("init_values", layer_scale_init)) if v is not None})
        self.is_beit = name.startswith(("beit_", "beitv2_"))
        if self.is_beit:
            kw.update(use_shared_rel_pos_bias=shared_rel_pos_bias and not for_finetune,
                      use_rel_pos_bias=shared_rel_pos_bias and for_finetune, use_abs_pos_emb=not shared_rel_pos_bias)
        try:
            self.vit = timm.create_model(name, **kw)
        except RuntimeError as e:  # unknown model name
            raise ValueError(f"model.name: {e}") from None
        # parts of the timm model this forward never uses (pooling head): drop them, so that DDP
        # sees no parameter without a gradient
        for part in ("fc_norm", "head", "head_drop", "attn_pool"):
            if isinstance(getattr(self.vit, part, None), nn.Module):
                setattr(self.vit, part, nn.Identity())
        if for_finetune:
            self.vit.norm = nn.Identity()
        if attention == "flex" and not (self.is_beit and use_flex_attention(self.vit)):
            raise ValueError(f"attention='flex' is for BEiT models' biased attention; {name} has none")
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
        x = embed_patches(v.patch_embed, x)
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


def embed_patches(pe: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``PatchEmbed`` - a convolution whose kernel and stride are the patch, flattened to
    tokens - as what it computes: each patch's pixels times one matrix. The same sum, but on an
    H200 cuDNN ran that 3-channel convolution at ~26 TFLOP/s (1.1 ms of a 39-ms ViT-B step, plus a
    layout change), where the matrix product takes microseconds (benchmarks/README.md)."""
    proj = getattr(pe, "proj", None)
    if not (isinstance(pe, timm.layers.PatchEmbed) and isinstance(proj, nn.Conv2d) and pe.flatten
            and proj.kernel_size == proj.stride == tuple(pe.patch_size) and proj.padding == (0, 0)
            and not pe.dynamic_img_pad):
        return pe(x)  # (another embedding, e.g. a hybrid ViT's CNN stem: timm's own forward)
    B, C, H, W = x.shape
    ph, pw = pe.patch_size
    if pe.img_size is not None and (H, W) != tuple(pe.img_size):
        raise ValueError(f"input of {H}x{W} pixels, but the model was built for {pe.img_size[0]}x{pe.img_size[1]}")
    x = x.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * ph * pw)
    return pe.norm(F.linear(x, proj.weight.reshape(proj.out_channels, -1), proj.bias))


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
