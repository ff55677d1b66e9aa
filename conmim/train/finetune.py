"""Fine-tuning a (pre-trained or random) encoder with a classifier, the reference's recipe:
layer-wise lr decay, AdamW, cosine schedule, label smoothing, mixup/cutmix, RandAugment, random
erasing; top-1 on the test and validation splits at the end."""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from conmim.config.experiment import ExperimentConfig
from conmim.data.sampler import EpochsOfBatches, ShardedBatches, batches
from conmim.data.sources import labelled_subset, load_splits
from conmim.data.transforms import FinetuneTransform
from conmim.failures import DivergedError
from conmim.method.vit import Classifier, param_groups
from conmim.train import checkpoint, schedules
from conmim.train.build import adamw, build_encoder
from conmim.train.evaluate import top1
from conmim.train.session import Session, micro_batches


def _randaug(spec: str, mean):
    from timm.data.auto_augment import rand_augment_transform
    ra = rand_augment_transform(spec, {"translate_const": 100, "img_mean": tuple(int(255 * m) for m in mean)})
    for op in ra.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return ra


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, where keeping 0 bits gives black as it did before Pillow 13 (which raises
    for 0): "rand-m9-mstd0.5-inc1" reaches 0 bits whenever the noisy magnitude hits its cap of 10,
    about 2 % of the times it posterizes, and the fine-tuning worker died of it."""
    from PIL import Image, ImageOps
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def finetune(cfg: ExperimentConfig, session: Session, encoder_state: dict | None, carry: dict | None = None,
             phase: str = "finetune", all_labels: bool = False, test: bool = True) -> dict:
    """Fine-tune ``encoder_state`` (a pre-trained or random encoder's weights; ignored when this
    session resumes from a checkpoint of this ``phase``) on the labels ``finetune.labels_per_class``
    allows, or on every label (``all_labels``: the full-label fine-tune of a low-label study,
    phase ``finetune_full``).

    ``carry`` (earlier phases' summaries) is stored in every checkpoint, so that a run restarted
    during fine-tuning does not need to redo them. Returns ``{phase}_top1`` (test; NaN with
    ``test=False`` or ``eval.test_split=false``, for a search that must not look at it), ``{phase}_val_top1``, the
    history and the wall seconds."""
    t0 = time.time()
    f = cfg.finetune
    torch.manual_seed(cfg.seed + 1)
    # Mixup/CutMix draw from numpy's global generator in this process, RandAugment and random erasing
    # from Python's where the batch is made (here with data.num_workers=0; loader workers are seeded
    # from torch's): seeded too, so that a seed gives the same fine-tuning, as the pairing of trials
    # by seed assumes. Per worker, so that Ray Train workers do not draw the same augmentations.
    np.random.seed([cfg.seed + 1, session.rank])
    random.seed(f"finetune/{cfg.seed}/{session.rank}")
    splits = load_splits(cfg.data)
    train = splits["train"]
    if f.labels_per_class and not all_labels:
        train = train.take(labelled_subset(train.labels, f.labels_per_class, cfg.seed))
    encoder = build_encoder(cfg, drop_path=f.drop_path, for_finetune=True)
    if encoder_state is not None:
        encoder.load_pretrained(encoder_state)
    encoder.mask_token.requires_grad_(False)
    net = Classifier(encoder, train.num_classes).to(session.device)
    model = session.ddp(net)
    opt = adamw(param_groups(net, f.weight_decay, f.layer_decay, encoder), f.lr, session.device)
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
            x = torch.stack([torch.from_numpy(np.array(randaug(Image.fromarray(im.permute(1, 2, 0).numpy())))).permute(2, 0, 1)
                             for im in x])
        x = tf(x, ep, index)
        if erase is not None:
            x = erase(x)
        return x, torch.as_tensor(train.labels[index])

    epoch, step = 0, 0
    history: list[dict] = []
    state = checkpoint.resumable(cfg, session, phase)
    if state is not None:
        net.load_state_dict(state["weights"]["classifier"])
        opt.load_state_dict(state["weights"]["optimizer"])
        checkpoint.set_rng_state(state["rng"])
        epoch, step, history = state["epoch"], state["step"], state["extra"]["history"]
        session.log(f"[{phase}] resumed at epoch {epoch}")

    def save(path: Path) -> None:
        checkpoint.save(path, phase, cfg, epoch, step, {"classifier": net.state_dict(), "optimizer": opt.state_dict()},
                        {"history": history, "carry": carry or {}})

    sampler = EpochsOfBatches(len(train), f.batch_size, session.rank, session.world, cfg.seed + 1, epoch, f.epochs)
    loader = iter(batches(make, sampler, cfg.data.num_workers, pin_memory=session.device.type == "cuda"))
    log_every = f.log_every or steps_per_epoch
    step_losses = []
    while epoch < f.epochs:
        te, first = time.time(), step
        acc = torch.zeros(2, dtype=torch.float64, device=session.device)  # loss sum, non-finite micro-batches
        for _ in range(steps_per_epoch):
            for g in opt.param_groups:
                g["lr"] = float(lr_at[step]) * g["lr_scale"]
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            # this worker's slice of the global batch in f.accumulate contiguous micro-batches (as in
            # pre-training); each micro-batch's mean loss / accumulate: the gradients add up to the
            # mean over the slice, and DDP's average over workers to the global batch's mean
            for k, (x, y) in enumerate(micro_batches(session.to_device(next(loader)), f.accumulate)):
                if mixup is not None:
                    x, target = mixup(x, y)
                with session.no_sync(model, skip=k < f.accumulate - 1):  # one gradient all-reduce per step
                    with session.autocast(f.amp):
                        logits = model(x)
                    if mixup is not None:
                        loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean() / f.accumulate
                    else:
                        loss = F.cross_entropy(logits.float(), y, label_smoothing=f.label_smoothing) / f.accumulate
                    loss.backward()
                acc += torch.stack([loss.detach().double(), (~torch.isfinite(loss.detach())).double()])
                if cfg.debug.log_steps:
                    step_loss = step_loss + loss.detach().double()
            opt.step()
            if cfg.debug.log_steps:  # (a read-back per step, for the tests: the step's loss, mean over workers)
                step_losses.append(session.all_reduce_sum(step_loss.clone()).item() / session.world)
            step += 1
            if (step - first) % log_every == 0 or step - first == steps_per_epoch:
                loss_total, bad = acc.tolist()  # the one wait for the device in a logging interval
                if bad:
                    raise DivergedError(f"fine-tuning loss became nan or inf by step {step} (epoch {epoch + 1})")
        epoch += 1
        m = {"epoch": epoch, f"{phase}_loss": loss_total / steps_per_epoch, f"{phase}_lr": float(lr_at[step - 1]),
             "epoch_seconds": time.time() - te}
        history.append(m)
        session.log(f"[{phase}] epoch {epoch}/{f.epochs} loss {m[f'{phase}_loss']:.4f} ({m['epoch_seconds']:.1f}s)")
        due = epoch % f.checkpoint_every == 0 or epoch == f.epochs
        session.report_epoch({**m, "phase": phase}, save if due else None)
    return {f"{phase}_top1": top1(net, splits["test"], cfg, session) if test and cfg.eval.test_split else float("nan"),
            f"{phase}_val_top1": top1(net, splits["val"], cfg, session),
            f"{phase}_history": history, f"{phase}_seconds": time.time() - t0,
            **({f"{phase}_step_losses": step_losses} if cfg.debug.log_steps else {})}
