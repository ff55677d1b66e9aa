"""ConMIM pre-training, top to bottom: the model, one step, and the epoch loop."""
from __future__ import annotations

import math
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from conmim import schedules
from conmim.config import ExperimentConfig
from conmim.data import ShardedBatches, batches, load_splits
from conmim.masking import create_mask_generator, masks_for
from conmim.model import EncoderWithProjector, MaskedViT, MomentumEncoder, Projector, autocast, param_groups
from conmim.objective import denoising_contrast_loss, target_spread
from conmim.session import Session
from conmim.transforms import TwoViewTransform


class DivergedError(RuntimeError):
    """The loss became NaN/inf: the trial failed, for a reason worth recording."""


class ConMIM(nn.Module):
    """Online encoder + projector, and the network that encodes the full view (the target):
    a :class:`MomentumEncoder` copy, or the online network itself (``target_encoder: shared``).

    One ``forward`` computes the whole objective, so DDP sees a single forward per backward even
    when the shared encoder runs twice (masked and full view)."""

    def __init__(self, cfg: ExperimentConfig):
        super().__init__()
        o = cfg.objective
        encoder = MaskedViT(cfg.model, drop_path=0.0)
        projector = Projector(encoder.embed_dim, cfg.model.projector_hidden, cfg.model.projector_out,
                              sync_bn=cfg.pretrain.sync_bn)
        self.online = EncoderWithProjector(encoder, projector)
        self.momentum = MomentumEncoder(self.online) if o.target_encoder == "momentum" else None
        self.temperature, self.dictionary, self.stop_grad = o.temperature, o.dictionary, o.stop_grad

    def forward(self, masked_view, full_view, mask, loss_mask):
        q = self.online(masked_view, mask)
        if self.momentum is not None:
            with torch.no_grad():
                k = self.momentum(full_view)
        elif self.stop_grad:
            with torch.no_grad():
                k = self.online(full_view)
        else:
            k = self.online(full_view)  # the key branch is differentiable: the ablation
        loss_sum = denoising_contrast_loss(q, k, loss_mask, self.temperature, self.dictionary, reduction="sum")
        return loss_sum, target_spread(k)

    def update_momentum(self, m: float) -> None:
        if self.momentum is not None:
            self.momentum.update(self.online, m)

    def encoder_for_finetune(self, which: str) -> MaskedViT:
        if which == "momentum" and self.momentum is not None:
            return self.momentum.net.encoder
        return self.online.encoder


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])  # (drop-path draws on the GPU)


def save_checkpoint(path: Path, cfg: ExperimentConfig, net: ConMIM, opt, epoch: int, step: int, extra: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    torch.save({
        "phase": "pretrain",
        "online": net.online.state_dict(),
        "momentum": net.momentum.state_dict() if net.momentum is not None else None,
        "optimizer": opt.state_dict() if opt is not None else None,
        "scaler": None,  # bf16 autocast needs no loss scaler; kept for the format's stability
        "epoch": epoch, "step": step, "rng": _rng_state(), "extra": extra,
        "config": cfg.to_dict(),
    }, path / "state.pt")
    (path / "config.yaml").write_text(cfg.to_yaml())
    return path


def resumable(cfg: ExperimentConfig, session: Session, phase: str) -> dict | None:
    """The state of the session's latest checkpoint if it is of this phase of this very
    experiment, else None."""
    with session.latest_checkpoint() as ckpt:
        if ckpt is None:
            return None
        # to the CPU: load_state_dict copies weights and optimiser state to their parameters'
        # device, while the RNG states must stay CPU tensors (a GPU checkpoint read on a CPU
        # and the reverse take the same path)
        state = torch.load(Path(ckpt) / "state.pt", map_location="cpu", weights_only=False)
    if state.get("phase", "pretrain") != phase:
        return None
    mine, theirs = cfg.to_dict(), dict(state.get("config") or {})
    mine.pop("debug"), theirs.pop("debug", None)
    if mine != theirs:
        session.log(f"[resume] ignoring checkpoint {ckpt}: it was written for another configuration")
        return None
    session.log(f"[{phase}] restarting from checkpoint {ckpt}")
    return state


def load_encoder_state(checkpoint_dir: Path, which: str) -> dict:
    """The encoder weights to fine-tune, from a pre-training checkpoint."""
    state = torch.load(Path(checkpoint_dir) / "state.pt", map_location="cpu", weights_only=False)
    src = state["momentum"] if which == "momentum" and state["momentum"] is not None else state["online"]
    prefix = "net.encoder." if which == "momentum" and state["momentum"] is not None else "encoder."
    return {k[len(prefix):]: v for k, v in src.items() if k.startswith(prefix)}


def _epoch_batches(cfg: ExperimentConfig, train, transform, maskgen, grid: int, session: Session, epoch: int):
    sampler = ShardedBatches(len(train), cfg.pretrain.batch_size, session.rank, session.world, cfg.seed, epoch)

    def make(ep, index):
        x = train.batch(index, cfg.model.img_size, crop=None if train.fixed_size else _loader_crop(cfg, ep))
        masked_view, full_view = transform(x, ep, index)
        mask = masks_for(maskgen, cfg.seed, ep, index)
        return masked_view, full_view, mask

    return sampler, batches(make, sampler, cfg.data.num_workers, pin_memory=session.device.type == "cuda")


def _loader_crop(cfg, epoch):
    from conmim import rng as crng
    from conmim.data import PerImageCrop
    a = cfg.augment
    return PerImageCrop(cfg.seed, epoch, cfg.model.img_size, a.crop_scale, a.crop_ratio, a.flip_p, crng.GEOMETRY)


def _injected_death(marker: Path, what: str, die) -> None:
    """A fault injected once (the marker survives the restart). It waits first: Ray Train's
    controller registers a reported checkpoint when it next polls the workers, so a worker dying a
    fraction of a second after reporting restarts from the checkpoint before. Real epochs last
    minutes; tiny test epochs last a second."""
    time.sleep(5)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(what + "\n")
    die()


def pretrain(cfg: ExperimentConfig, session: Session) -> dict:
    """Run (or resume) pre-training; returns the final metrics and the last checkpoint path."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)  # same initial weights on every worker
    splits = load_splits(cfg.data)
    train = splits["train"]
    net = ConMIM(cfg)
    # AdamW turns float32 round-off in near-zero gradients into lr-sized steps, so runs that differ
    # only in summation order drift apart; float64 keeps that drift below what the tests compare.
    dtype = torch.float64 if cfg.debug.float64 else torch.float32
    net.to(session.device, dtype)
    model = net
    # Global BatchNorm all-reduces inside autograd; DDP's asynchronous bucket all-reduces would
    # interleave with those collectives, so with sync_bn the gradients are averaged after backward.
    manual_sync = session.collectives and cfg.pretrain.sync_bn
    if not manual_sync:
        model = session.ddp(net)
    if cfg.pretrain.compile:
        model = torch.compile(model)

    p = cfg.pretrain
    opt = torch.optim.AdamW(param_groups(net.online, p.weight_decay), lr=p.lr, betas=tuple(p.betas))
    grid = cfg.model.grid
    transform = TwoViewTransform(cfg.augment, cfg.objective.perturbation, cfg.model.img_size,
                                 train.mean, train.std, cfg.seed, geometry=train.fixed_size)
    maskgen = create_mask_generator(cfg.masking, grid)
    steps_per_epoch = len(ShardedBatches(len(train), p.batch_size, 0, 1, cfg.seed, 0))
    if steps_per_epoch == 0:
        raise ValueError(f"pretrain.batch_size={p.batch_size} is larger than the {len(train)} training images")
    total = p.epochs * steps_per_epoch
    lr_at = schedules.cosine(schedules.scaled_lr(p.lr, p.batch_size, p.lr_batch_size), p.min_lr, total,
                             int(p.warmup_epochs * steps_per_epoch))
    m_at = schedules.momentum(cfg.objective.momentum or 0.0, total)

    epoch, step = 0, 0
    history: list[dict] = []
    resumed: dict = {}
    state = resumable(cfg, session, "pretrain")
    if state is not None:
        net.online.load_state_dict(state["online"])
        if net.momentum is not None:
            net.momentum.load_state_dict(state["momentum"])
        opt.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        epoch, step = state["epoch"], state["step"]
        history = state["extra"].get("history", [])
        session.log(f"[pretrain] resumed at epoch {epoch}, step {step}")
        resumed = {"resumed_from_step": step}  # reported with the next epoch: a restart is visible

    amp = autocast(session.device, p.amp)
    step_losses = []
    crash_marker = session.out_dir / ".crash_injected"
    kill_marker = session.out_dir / ".kill_injected"
    while epoch < p.epochs:
        te = time.time()
        sampler, loader = _epoch_batches(cfg, train, transform, maskgen, grid, session, epoch)
        sums = torch.zeros(4, dtype=torch.float64)  # loss_sum, count, spread, grad_norm
        n_steps = 0
        net.train()
        for masked_view, full_view, mask in loader:
            masked_view = masked_view.to(session.device, dtype, non_blocking=True)
            full_view = full_view.to(session.device, dtype, non_blocking=True)
            mask = mask.to(session.device, non_blocking=True)
            loss_mask = mask if cfg.masking.enabled else torch.ones_like(mask)
            for g in opt.param_groups:
                g["lr"] = float(lr_at[step])
            with amp:
                loss_sum, spread = model(masked_view, full_view, mask, loss_mask)
            # Mean over all masked patches of the global batch: DDP averages gradients over
            # workers, so each worker scales its sum by world / global count.
            stats = session.all_reduce_sum(torch.stack([loss_sum.detach().double(), loss_mask.sum().double()]))
            count = max(stats[1].item(), 1.0)
            loss = loss_sum * session.world / count
            if cfg.debug.nan_at_step is not None and step == cfg.debug.nan_at_step:
                loss = loss * float("nan")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if manual_sync:
                session.average_gradients(net.online.parameters())
            gn = nn.utils.clip_grad_norm_(net.online.parameters(), p.clip_grad or float("inf"))
            step_loss = stats[0].item() / count
            if not math.isfinite(loss.item()) or not math.isfinite(step_loss):
                raise DivergedError(f"pre-training loss is {loss.item()} at step {step} (epoch {epoch})")
            opt.step()
            net.update_momentum(float(m_at[step]))
            step += 1
            n_steps += 1
            sums += torch.tensor([step_loss, 1.0, float(spread), float(gn)], dtype=torch.float64)
            if cfg.debug.log_steps:
                step_losses.append(step_loss)
            if step == cfg.debug.crash_at_step and not crash_marker.exists():
                _injected_death(crash_marker, f"worker {session.rank} died at step {step}",
                                lambda: os._exit(13))  # a real process death, not an exception Ray could catch
            if step == cfg.debug.kill_at_step and not kill_marker.exists():
                _injected_death(kill_marker, f"worker {session.rank} pid {os.getpid()} SIGKILLed at step {step}",
                                lambda: os.kill(os.getpid(), signal.SIGKILL))  # as `kill -9` or the OOM killer
        epoch += 1
        metrics = {
            "epoch": epoch, "step": step,
            "pretrain_loss": sums[0].item() / max(n_steps, 1),
            "lr": float(lr_at[step - 1]) if step else 0.0,
            "momentum": float(m_at[step - 1]) if (step and net.momentum is not None) else float("nan"),
            "grad_norm": sums[3].item() / max(n_steps, 1),
            "target_std": sums[2].item() / max(n_steps, 1),
            "epoch_seconds": time.time() - te,
            **resumed,
        }
        resumed = {}
        if cfg.eval.proxy_every and epoch % cfg.eval.proxy_every == 0:
            from conmim.evaluate import knn_top1_of
            metrics["knn_proxy_top1"] = knn_top1_of(net.encoder_for_finetune(cfg.finetune.encoder), splits["train"],
                                                    splits["val"], cfg, session.device)
        history.append(metrics)
        session.log(f"[pretrain] epoch {epoch}/{p.epochs} loss {metrics['pretrain_loss']:.4f} "
                    f"lr {metrics['lr']:.2e} m {metrics['momentum']:.4f} target_std {metrics['target_std']:.3f} "
                    f"({metrics['epoch_seconds']:.1f}s)")
        ckpt_dir = None
        tmp = None
        if epoch % p.checkpoint_every == 0 or epoch == p.epochs:
            if session.is_main:
                tmp = tempfile.TemporaryDirectory(prefix="conmim-ckpt-")
                ckpt_dir = str(save_checkpoint(Path(tmp.name), cfg, net, opt, epoch, step, {"history": history}))
        session.report({**metrics, "phase": "pretrain"}, ckpt_dir)
        if tmp is not None:
            tmp.cleanup()
    if cfg.debug.dump_replicas:
        (session.out_dir / "replicas").mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in net.state_dict().items()}, session.out_dir / "replicas" / f"rank{session.rank}.pt")
    return {"history": history, "step": step, "step_losses": step_losses,
            "final_pretrain_loss": history[-1]["pretrain_loss"] if history else float("nan"),
            "final_target_std": history[-1]["target_std"] if history else float("nan"),
            "pretrain_seconds": time.time() - t0, "net": net}
