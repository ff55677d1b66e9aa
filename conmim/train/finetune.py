"""Fine-tuning a (pre-trained or random) encoder with a classifier, and top-1 on held-out data."""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from conmim import schedules
from conmim.config import ExperimentConfig
from conmim.data import ShardedBatches, batches, load_splits
from conmim.model import Classifier, MaskedViT, autocast, param_groups
from conmim.pretrain import DivergedError, _rng_state, _set_rng_state, resumable
from conmim.session import Session
from conmim.transforms import EvalTransform, FinetuneTransform


def _randaug(spec: str, mean):
    from timm.data.auto_augment import rand_augment_transform
    return rand_augment_transform(spec, {"translate_const": 100, "img_mean": tuple(int(255 * m) for m in mean)})


@torch.no_grad()
def top1(model: nn.Module, images, cfg: ExperimentConfig, session: Session, batch_size: int = 512) -> float:
    """Top-1 over ``images``, each worker scoring a disjoint slice."""
    model.eval()
    tf = EvalTransform(cfg.model.img_size, images.mean, images.std)
    idx = np.array_split(np.arange(len(images)), session.world)[session.rank]
    counts = torch.zeros(2, dtype=torch.float64, device=session.device)  # correct, seen
    for i in range(0, len(idx), batch_size):
        j = idx[i: i + batch_size]
        x = tf(images.batch(j, cfg.model.img_size)).to(session.device, non_blocking=True)
        y = torch.as_tensor(images.labels[j]).to(session.device, non_blocking=True)
        with autocast(session.device, cfg.pretrain.amp):
            logits = model(x)
        counts[0] += (logits.argmax(1) == y).sum()
        counts[1] += len(j)
    model.train()
    tot = session.all_reduce_sum(counts)
    return (tot[0] / tot[1]).item()


def finetune_checkpoint_state(cfg: ExperimentConfig, session: Session) -> dict | None:
    """The fine-tuning checkpoint this session restarts from, if any."""
    return resumable(cfg, session, "finetune")


def finetune(cfg: ExperimentConfig, session: Session, encoder_state: dict | None, carry: dict | None = None) -> dict:
    """Fine-tune ``encoder_state`` (None when resuming from a fine-tuning checkpoint).

    ``carry`` (earlier phases' summaries) is stored in every checkpoint, so that a run restarted
    during fine-tuning does not need to redo them. Returns finetune/val top-1 and timings."""
    t0 = time.time()
    f = cfg.finetune
    torch.manual_seed(cfg.seed + 1)
    splits = load_splits(cfg.data)
    train = splits["train"]
    encoder = MaskedViT(cfg.model, drop_path=f.drop_path, for_finetune=True)
    if encoder_state is not None:
        encoder.load_pretrained(encoder_state)
    encoder.mask_token.requires_grad_(False)
    net = Classifier(encoder, train.num_classes).to(session.device)
    model = session.ddp(net)
    opt = torch.optim.AdamW(param_groups(net, f.weight_decay, f.layer_decay, encoder), lr=f.lr)
    steps_per_epoch = len(ShardedBatches(len(train), f.batch_size, 0, 1, cfg.seed, 0))
    if steps_per_epoch == 0 and f.epochs:
        raise ValueError(f"finetune.batch_size={f.batch_size} is larger than the {len(train)} training images")
    total = f.epochs * steps_per_epoch
    lr_at = schedules.cosine(schedules.scaled_lr(f.lr, f.batch_size, f.lr_batch_size), f.min_lr, total,
                             int(f.warmup_epochs * steps_per_epoch))

    mixup = None
    if f.mixup > 0 or f.cutmix > 0:
        from timm.data import Mixup
        mixup = Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, label_smoothing=f.label_smoothing,
                      num_classes=train.num_classes)
    erase = None
    if f.random_erasing > 0:
        from timm.data.random_erasing import RandomErasing
        erase = RandomErasing(f.random_erasing, mode="pixel", device="cpu")
    randaug = _randaug(f.randaug, train.mean) if f.randaug else None
    tf = FinetuneTransform(cfg.model.img_size, train.mean, train.std, cfg.seed, scale=tuple(f.crop_scale))

    def make(ep, index):
        from PIL import Image
        x = train.batch(index, cfg.model.img_size)
        if randaug is not None:
            x = torch.stack([torch.from_numpy(np.asarray(randaug(Image.fromarray(im.permute(1, 2, 0).numpy())))).permute(2, 0, 1)
                             for im in x])
        x = tf(x, ep, index)
        if erase is not None:
            x = erase(x)
        return x, torch.as_tensor(train.labels[index])

    epoch, step = 0, 0
    history: list[dict] = []
    state = finetune_checkpoint_state(cfg, session)
    if state is not None:
        net.load_state_dict(state["classifier"])
        opt.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        epoch, step, history = state["epoch"], state["step"], state["history"]
        session.log(f"[finetune] resumed at epoch {epoch}")

    amp = autocast(session.device, cfg.pretrain.amp)
    while epoch < f.epochs:
        te = time.time()
        sampler = ShardedBatches(len(train), f.batch_size, session.rank, session.world, cfg.seed + 1, epoch)
        loss_sum, n = 0.0, 0
        for x, y in batches(make, sampler, cfg.data.num_workers, pin_memory=session.device.type == "cuda"):
            x, y = x.to(session.device, non_blocking=True), y.to(session.device, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = float(lr_at[step]) * g["lr_scale"]
            if mixup is not None:
                x, target = mixup(x, y)
            with amp:
                logits = model(x)
            if mixup is not None:
                loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=f.label_smoothing)
            if not math.isfinite(loss.item()):
                raise DivergedError(f"fine-tuning loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            n += 1
            step += 1
        epoch += 1
        m = {"epoch": epoch, "finetune_loss": loss_sum / max(n, 1), "finetune_lr": float(lr_at[step - 1]),
             "epoch_seconds": time.time() - te}
        history.append(m)
        session.log(f"[finetune] epoch {epoch}/{f.epochs} loss {m['finetune_loss']:.4f} ({m['epoch_seconds']:.1f}s)")
        tmp, ckpt_dir = None, None
        if session.is_main and (epoch % cfg.pretrain.checkpoint_every == 0 or epoch == f.epochs):
            tmp = tempfile.TemporaryDirectory(prefix="conmim-ft-")
            torch.save({"phase": "finetune", "carry": carry or {}, "config": cfg.to_dict(), "classifier": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                        "step": step, "rng": _rng_state(), "history": history}, Path(tmp.name) / "state.pt")
            ckpt_dir = tmp.name
        session.report({**m, "phase": "finetune"}, ckpt_dir)
        if tmp is not None:
            tmp.cleanup()
    return {"finetune_top1": top1(net, splits["test"], cfg, session),
            "finetune_val_top1": top1(net, splits["val"], cfg, session),
            "finetune_history": history, "finetune_seconds": time.time() - t0}
