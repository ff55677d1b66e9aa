"""ConMIM pre-training, top to bottom: build the networks, resume if a checkpoint of this very
experiment exists, then per epoch: batches of two views and masks -> the objective -> AdamW ->
the momentum update; report (and checkpoint) once per epoch."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from conmim.config.experiment import ExperimentConfig
from conmim.data import rng as crng
from conmim.data.masking import masks_for
from conmim.data.sampler import EpochsOfBatches, ShardedBatches, batches
from conmim.data.sources import load_splits
from conmim.data.geometry import PerImageCrop
from conmim.data.transforms import TwoViewTransform
from conmim.failures import DivergedError
from conmim.method.vit import param_groups
from conmim.train import checkpoint, faults, schedules
from conmim.train.build import adamw, build_conmim, compiled, compiled_views, mark_step_begin, mask_generator
from conmim.train.evaluate import knn_top1_of
from conmim.train.session import Session, micro_batches


def pretrain(cfg: ExperimentConfig, session: Session) -> dict:
    """Run (or resume) pre-training; returns the history, final loss and target spread, and the
    trained :class:`ConMIM` (``net``)."""
    t0 = time.time()
    p = cfg.pretrain
    torch.manual_seed(cfg.seed)  # same initial weights on every worker
    splits = load_splits(cfg.data)
    train = splits["train"]
    net = build_conmim(cfg)
    # AdamW turns float32 round-off in near-zero gradients into lr-sized steps, so runs that differ
    # only in summation order drift apart; float64 keeps that drift below what the tests compare.
    dtype = torch.float64 if cfg.debug.float64 else torch.float32
    net.to(session.device, dtype)
    # Global BatchNorm all-reduces inside autograd; DDP's asynchronous bucket all-reduces would
    # interleave with those collectives, so with sync_bn the gradients are averaged after backward.
    manual_sync = session.collectives and p.sync_bn
    model = ddp = net if manual_sync else session.ddp(net)
    model = compiled(model, p.compile)
    opt = adamw(param_groups(net.online, p.weight_decay), p.lr, session.device, betas=tuple(p.betas))

    transform = TwoViewTransform(cfg.augment, cfg.objective.perturbation, cfg.model.img_size,
                                 train.mean, train.std, cfg.seed, geometry=train.fixed_size)
    views = compiled_views(transform, p.compile)
    maskgen = mask_generator(cfg)
    steps_per_epoch = len(ShardedBatches(len(train), p.batch_size, 0, 1, cfg.seed, 0))
    if steps_per_epoch == 0:
        raise ValueError(f"pretrain.batch_size={p.batch_size} is larger than the {len(train)} training images")
    total = p.epochs * steps_per_epoch
    lr_at = schedules.cosine(schedules.scaled_lr(p.lr, p.batch_size, p.lr_batch_size), p.min_lr, total,
                             int(p.warmup_epochs * steps_per_epoch))
    m_at = schedules.momentum(cfg.objective.momentum or 0.0, total)

    epoch, step, history, resumed = 0, 0, [], {}
    state = checkpoint.resumable(cfg, session, "pretrain")
    if state is not None:
        w = state["weights"]
        net.online.load_state_dict(w["online"])
        if net.momentum is not None:
            net.momentum.load_state_dict(w["momentum"])
        opt.load_state_dict(w["optimizer"])
        checkpoint.set_rng_state(state["rng"])
        epoch, step, history = state["epoch"], state["step"], state["extra"]["history"]
        session.log(f"[pretrain] resumed at epoch {epoch}, step {step}")
        resumed = {"resumed_from_step": step}  # reported with the next epoch: a restart is visible

    def save(path: Path) -> None:
        weights = {"online": net.online.state_dict(), "optimizer": opt.state_dict(),
                   "momentum": net.momentum.state_dict() if net.momentum is not None else None}
        checkpoint.save(path, "pretrain", cfg, epoch, step, weights, {"history": history})

    # The mean over every masked patch of the global batch, with a count fixed by the masking
    # (every mask has `net.rows` patches): DDP averages gradients over workers, so each worker
    # scales its sum by world / global count, and nothing is read back from the device per step.
    # With accumulation the micro-batches' gradients add up to the same global mean: the scale
    # does not depend on how the global batch is split.
    global_rows = p.batch_size * net.rows
    loader = iter(_batches(cfg, train, transform, maskgen, session, epoch))
    log_every = p.log_every or steps_per_epoch
    step_losses = []
    while epoch < p.epochs:
        te, first = time.time(), step
        acc = torch.zeros(4, dtype=torch.float64, device=session.device)  # loss sum, spread, grad norm, non-finite
        read = step  # the step of the last read-back
        net.train()
        for _ in range(steps_per_epoch):
            for g in opt.param_groups:
                g["lr"] = float(lr_at[step])
            opt.zero_grad(set_to_none=True)
            step_sum = 0.0
            # The loader yields this worker's slice of the global batch, cut here into p.accumulate
            # contiguous micro-batches (the slices world x accumulate workers would get): the
            # sampler, the prefetch depth and resuming stay counted in optimiser steps, and the
            # uint8 slice is small next to the activations, which only a micro-batch's views make.
            for k, (images, params, mask) in enumerate(micro_batches(session.to_device(next(loader)), p.accumulate)):
                masked_view, full_view = (v.to(dtype) for v in views(images, params))
                loss_mask = mask if cfg.masking.enabled else torch.ones_like(mask)
                with session.no_sync(ddp, skip=k < p.accumulate - 1):  # one gradient all-reduce per step
                    mark_step_begin(p.compile)
                    with session.autocast(p.amp):
                        loss_sum, spread = model(masked_view, full_view, mask, loss_mask)
                    loss = faults.poison(cfg, step, loss_sum * session.world / global_rows)
                    loss.backward()
                # (the loss sum from the loss itself, so that a NaN injected into it is counted)
                acc[:2] += torch.stack([loss.detach().double() * (global_rows / session.world),
                                        spread.detach().double() / p.accumulate])
                acc[3] += (~torch.isfinite(loss.detach())).double()
                if cfg.debug.log_steps:
                    step_sum = step_sum + loss_sum.detach().double()
            if manual_sync:
                session.average_gradients(net.online.parameters())
            gn = nn.utils.clip_grad_norm_(net.online.parameters(), p.clip_grad or float("inf"))
            opt.step()
            net.update_momentum(float(m_at[step]))
            acc[2] += gn.detach().double()
            step += 1
            if cfg.debug.log_steps:  # (a read-back per step: for the tests that compare runs step by step)
                step_losses.append(session.all_reduce_sum(step_sum.clone()).item() / global_rows)
            faults.after_step(cfg, session.out_dir, session.rank, step)
            if step - read == log_every and step - first < steps_per_epoch:
                t = _read_back(session, acc, read, step, epoch)
                session.log(f"[pretrain] epoch {epoch + 1} step {step - first}/{steps_per_epoch} "
                            f"loss {t[0] / ((step - first) * global_rows):.4f}")
                read = step
        totals = _read_back(session, acc, read, step, epoch)
        epoch += 1
        n = step - first
        metrics = {
            "epoch": epoch, "step": step, "pretrain_loss": totals[0] / (n * p.batch_size * net.rows),
            "lr": float(lr_at[step - 1]) if step else 0.0,
            "momentum": float(m_at[step - 1]) if (step and net.momentum is not None) else float("nan"),
            "grad_norm": totals[2] / (n * session.world), "target_std": totals[1] / (n * session.world),
            "epoch_seconds": time.time() - te, **resumed,
        }
        resumed = {}
        if cfg.eval.proxy_every and epoch % cfg.eval.proxy_every == 0:  # (validation split)
            metrics["knn_proxy_top1"] = knn_top1_of(net.encoder(cfg.finetune.encoder), splits["train"],
                                                    splits["val"], cfg, session.device, session)
            if cfg.eval.probe_online and net.encoder(cfg.finetune.encoder) is not net.online.encoder:
                metrics["knn_proxy_online_top1"] = knn_top1_of(net.online.encoder, splits["train"], splits["val"],
                                                               cfg, session.device, session)
        history.append(metrics)
        session.log(f"[pretrain] epoch {epoch}/{p.epochs} loss {metrics['pretrain_loss']:.4f} "
                    f"lr {metrics['lr']:.2e} m {metrics['momentum']:.4f} target_std {metrics['target_std']:.3f} "
                    f"({metrics['epoch_seconds']:.1f}s)")
        due = epoch % p.checkpoint_every == 0 or epoch == p.epochs
        session.report_epoch({**metrics, "phase": "pretrain"}, save if due else None)
    if cfg.debug.dump_replicas:
        (session.out_dir / "replicas").mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in net.state_dict().items()}, session.out_dir / "replicas" / f"rank{session.rank}.pt")
    return {"history": history, "step": step, "step_losses": step_losses,
            "final_pretrain_loss": history[-1]["pretrain_loss"] if history else float("nan"),
            "final_target_std": history[-1]["target_std"] if history else float("nan"),
            "pretrain_seconds": time.time() - t0, "net": net}


def _batches(cfg: ExperimentConfig, train, transform, maskgen, session: Session, start: int):
    """This worker's batches from epoch ``start`` to the end, from one DataLoader: per batch the
    uint8 images (cropped already for files of different sizes), the views' parameters and the
    masks, all made host-side; the views themselves are computed on the training device."""
    sampler = EpochsOfBatches(len(train), cfg.pretrain.batch_size, session.rank, session.world, cfg.seed, start,
                              cfg.pretrain.epochs)
    a = cfg.augment

    def make(ep, index):
        crop = None if train.fixed_size else PerImageCrop(cfg.seed, ep, cfg.model.img_size, a.crop_scale,
                                                          a.crop_ratio, a.flip_p, crng.GEOMETRY, cfg.data.decode_draft)
        x = train.batch(index, cfg.model.img_size, crop=crop)
        return x, transform.params(ep, index, x.shape[2], x.shape[3]), masks_for(maskgen, cfg.seed, ep, index)

    return batches(make, sampler, cfg.data.num_workers, pin_memory=session.device.type == "cuda")


def _read_back(session: Session, acc, since: int, last: int, epoch: int) -> list[float]:
    """The epoch's accumulators summed over workers, read once (the only wait for the device in a
    logging interval); a loss that became NaN or inf after step ``since`` ends the trial here
    (an earlier one would have ended it at the earlier read-back)."""
    totals = session.all_reduce_sum(acc.clone()).tolist()
    if totals[3] > 0:
        raise DivergedError(f"pre-training loss became nan or inf between steps {since + 1} and {last} "
                            f"(epoch {epoch + 1})")
    return totals
