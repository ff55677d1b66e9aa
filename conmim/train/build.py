"""Where the config meets the networks: the encoder and the ConMIM module built from an
experiment's keys (the networks themselves take plain arguments)."""
from __future__ import annotations

import torch

from conmim.config.experiment import CUDA_GRAPH_MODES, ExperimentConfig
from conmim.data.masking import create_mask_generator, loss_rows
from conmim.method.conmim import ConMIM
from conmim.method.heads import EncoderWithProjector, Projector
from conmim.method.vit import MaskedViT


def build_encoder(cfg: ExperimentConfig, drop_path: float = 0.0, for_finetune: bool = False) -> MaskedViT:
    """The encoder of pre-training, or of fine-tuning (which runs uncompiled: SDPA's attention)."""
    m = cfg.model
    return MaskedViT(m.name, m.img_size, m.patch_size, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                     layer_scale_init=m.layer_scale_init, shared_rel_pos_bias=m.shared_rel_pos_bias,
                     drop_path=drop_path, for_finetune=for_finetune,
                     attention="sdpa" if for_finetune else cfg.pretrain.attention)


def mask_generator(cfg: ExperimentConfig):
    return create_mask_generator(cfg.masking, cfg.model.grid)


def build_conmim(cfg: ExperimentConfig) -> ConMIM:
    encoder = build_encoder(cfg)  # drop-path 0 in pre-training, as the reference
    projector = Projector(encoder.embed_dim, cfg.model.projector_hidden, cfg.model.projector_out,
                          sync_bn=cfg.pretrain.sync_bn)
    o = cfg.objective
    return ConMIM(EncoderWithProjector(encoder, projector), target_encoder=o.target_encoder, stop_grad=o.stop_grad,
                  temperature=o.temperature, dictionary=o.dictionary,
                  rows=loss_rows(mask_generator(cfg), cfg.model.grid ** 2))


def adamw(groups, lr: float, device, **kw) -> torch.optim.AdamW:
    """AdamW; on CUDA its fused kernel (the same update in a few launches instead of a chain of
    foreach kernels per step: at batch 64 a ViT-B step is short enough for that to show)."""
    return torch.optim.AdamW(groups, lr=lr, fused=torch.device(device).type == "cuda", **kw)


def compiled(module: torch.nn.Module, compile_: bool | str) -> torch.nn.Module:
    """``pretrain.compile``: the module as ``torch.compile`` makes it, ``true`` being Inductor's
    default mode and a string one of its modes; ``false``: the module itself."""
    if compile_ is False:
        return module
    return torch.compile(module, mode=None if compile_ is True else compile_)


def compiled_views(transform, compile_: bool | str):
    """The two views' maker of a compiled run, compiled too: Inductor fuses their ~150 small
    kernels (crop, jitter, blur, solarize, normalise) into a few, which leaves the host fewer
    launches per step (one graph; 2.6-3.7x faster on the CPU by benchmarks/views.py, equal to
    ~1e-5). Inductor's default mode whatever the step's: under CUDA graphs the views' outputs would
    belong to the iteration that :func:`mark_step_begin` ends just before the step reads them."""
    return transform.views if compile_ is False else torch.compile(transform.views)


def mark_step_begin(compile_: bool | str) -> None:
    """Before each forward of a compiled step: with CUDA graphs ('reduce-overhead', 'max-autotune'),
    the outputs of the previous replay may be overwritten from here on. Torch infers a new
    iteration when no backward is pending; saying so costs nothing and does not rest on that."""
    if compile_ in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()
