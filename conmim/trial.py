"""One unit of work: pre-train under one config, probe the frozen encoder, fine-tune, report.

``run_in_process`` runs it here; :mod:`conmim.distributed` runs the same phases on Ray Train
workers. Both end in the same ``result.json``."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from conmim.config import ExperimentConfig, canonical_hash
from conmim.data import load_splits
from conmim.evaluate import probes
from conmim.finetune import finetune, finetune_checkpoint_state
from conmim.model import MaskedViT
from conmim.pretrain import load_encoder_state, pretrain
from conmim.results import write_result
from conmim.session import LocalSession, Session

CHANCE_MARGIN = 0.05  # a top-1 within 5 points of chance counts as "at chance"
COLLAPSE_STD = 0.1    # normalised target features with spread below this have collapsed


def scratch_encoder_state(cfg: ExperimentConfig) -> dict:
    torch.manual_seed(cfg.seed)
    return MaskedViT(cfg.model).state_dict()


def summarize(cfg: ExperimentConfig, pre: dict | None, probe: dict, ft: dict, timings: dict, num_classes: int) -> dict:
    """The result record of a trial (also the row of the sweep's results table)."""
    chance = 1.0 / num_classes
    std = pre["final_target_std"] if pre else float("nan")
    res = {
        "finetune_top1": ft["finetune_top1"],
        "finetune_val_top1": ft["finetune_val_top1"],
        "linear_probe_top1": probe.get("linear_probe_top1", float("nan")),
        "knn_top1": probe.get("knn_top1", float("nan")),
        "final_pretrain_loss": pre["final_pretrain_loss"] if pre else float("nan"),
        "final_target_std": std,
        "collapsed": bool(pre is not None and math.isfinite(std) and std < COLLAPSE_STD),
        "at_chance": bool(ft["finetune_top1"] < chance + CHANCE_MARGIN),
        **timings,
        "canonical_hash": canonical_hash(cfg),
        "pretrain_history": pre["history"] if pre else [],
        "finetune_history": ft["finetune_history"],
        "config": cfg.to_dict(),
    }
    if pre and pre.get("step_losses"):
        res["step_losses"] = pre["step_losses"]
    return res


def trial_phases(cfg: ExperimentConfig, pre_session: Session, ft_session: Session) -> tuple[dict, dict]:
    """Pre-train (or resume), probe the frozen encoder, fine-tune (or resume).

    Returns (carry, fine-tuning result); ``carry`` holds the pre-training summary, the probes and
    their timings, and travels in every fine-tuning checkpoint, so a run restarted during
    fine-tuning skips the phases it already did."""
    ft_state = finetune_checkpoint_state(cfg, ft_session)
    if ft_state is not None:
        return ft_state["carry"], finetune(cfg, ft_session, None, ft_state["carry"])
    t0 = time.time()
    pre = None
    if cfg.pretrain.enabled:
        pre = pretrain(cfg, pre_session)
        encoder = pre.pop("net").encoder_for_finetune(cfg.finetune.encoder)
        state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    else:
        state = scratch_encoder_state(cfg)
    t1 = time.time()
    probe = {}
    if pre_session.is_main:  # frozen-feature proxies: cheap, on one worker while the others wait
        frozen = MaskedViT(cfg.model).to(pre_session.device)
        frozen.load_state_dict(state)
        probe = probes(frozen, load_splits(cfg.data), cfg, pre_session.device)
        del frozen
    ft_session.barrier()
    carry = {"pre": pre, "probe": probe, "pretrain_seconds": t1 - t0, "probe_seconds": time.time() - t1}
    return carry, finetune(cfg, ft_session, state, carry)


def result_of(cfg: ExperimentConfig, carry: dict, ft: dict, wall: float) -> dict:
    timings = {"pretrain_seconds": carry["pretrain_seconds"], "probe_seconds": carry["probe_seconds"],
               "finetune_seconds": ft["finetune_seconds"], "wall_seconds": wall}
    return summarize(cfg, carry["pre"], carry["probe"], ft, timings, load_splits(cfg.data)["train"].num_classes)


def run_in_process(cfg: ExperimentConfig, out: str | Path, device: str = "cpu") -> dict:
    out = Path(out)
    t0 = time.time()
    carry, ft = trial_phases(cfg, LocalSession(out, "pretrain", device), LocalSession(out, "finetune", device))
    result = result_of(cfg, carry, ft, time.time() - t0)
    write_result(out, result)
    return result


def finetune_from_checkpoint(cfg: ExperimentConfig, checkpoint: str | Path, out: str | Path, device: str = "cpu") -> dict:
    state = load_encoder_state(Path(checkpoint), cfg.finetune.encoder)
    t0 = time.time()
    ft = finetune(cfg, LocalSession(out, "finetune", device), state)
    return {**{k: v for k, v in ft.items() if k != "finetune_history"}, "finetune_seconds": time.time() - t0}
