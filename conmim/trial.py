"""One unit of work: pre-train under one config, probe the frozen encoder, fine-tune, report.

``run_in_process`` runs it here; :mod:`conmim.distributed` runs the same phases on Ray Train
workers. Both end in the same ``result.json``."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from conmim.config import ExperimentConfig, canonical_hash
from conmim.data import load_splits
from conmim.evaluate import probes
from conmim.finetune import finetune
from conmim.model import MaskedViT
from conmim.pretrain import load_encoder_state, pretrain
from conmim.session import LocalSession

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


def write_result(out: Path, result: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=float))
    os.replace(tmp, out / "result.json")
    return out / "result.json"


def run_in_process(cfg: ExperimentConfig, out: str | Path, device: str = "cpu") -> dict:
    out = Path(out)
    t0 = time.time()
    pre = None
    if cfg.pretrain.enabled:
        pre = pretrain(cfg, LocalSession(out, "pretrain", device))
        encoder = pre.pop("net").encoder_for_finetune(cfg.finetune.encoder)
        state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    else:
        state = scratch_encoder_state(cfg)
    t1 = time.time()
    splits = load_splits(cfg.data)
    frozen = MaskedViT(cfg.model).to(device)
    frozen.load_state_dict(state)
    probe = probes(frozen, splits, cfg, torch.device(device))
    t2 = time.time()
    ft = finetune(cfg, LocalSession(out, "finetune", device), state)
    t3 = time.time()
    timings = {"pretrain_seconds": t1 - t0, "probe_seconds": t2 - t1, "finetune_seconds": t3 - t2,
               "wall_seconds": t3 - t0}
    result = summarize(cfg, pre, probe, ft, timings, splits["train"].num_classes)
    write_result(out, result)
    return result


def finetune_from_checkpoint(cfg: ExperimentConfig, checkpoint: str | Path, out: str | Path, device: str = "cpu") -> dict:
    state = load_encoder_state(Path(checkpoint), cfg.finetune.encoder)
    t0 = time.time()
    ft = finetune(cfg, LocalSession(out, "finetune", device), state)
    return {**{k: v for k, v in ft.items() if k != "finetune_history"}, "finetune_seconds": time.time() - t0}
