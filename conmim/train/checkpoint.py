"""One checkpoint format for both phases: ``state.pt`` (weights, optimiser, epoch, step, RNG
states, the phase's history) and ``config.yaml`` beside it. A run restarts only from a checkpoint
of its own phase and of this very experiment."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from conmim.config.experiment import ExperimentConfig
from conmim.train.session import Session


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])  # (drop-path draws on the GPU)


def save(path: Path, phase: str, cfg: ExperimentConfig, epoch: int, step: int, weights: dict,
         extra: Optional[dict] = None) -> Path:
    """``weights``: name -> state dict (modules and the optimiser); ``extra``: what the phase needs
    to continue (its history; for fine-tuning, the earlier phases' summaries)."""
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"phase": phase, "config": cfg.to_dict(), "epoch": epoch, "step": step, "rng": rng_state(),
                "weights": weights, "extra": extra or {}}, path / "state.pt")
    (path / "config.yaml").write_text(cfg.to_yaml())
    return path


def read(path: Path) -> dict:
    # to the CPU: load_state_dict copies weights and optimiser state to their parameters' device,
    # while the RNG states must stay CPU tensors (a GPU checkpoint read on a CPU and the reverse
    # take the same path)
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)


def resumable(cfg: ExperimentConfig, session: Session, phase: str) -> Optional[dict]:
    """The state of the session's latest checkpoint if it is of this phase of this very
    experiment, else None."""
    with session.latest_checkpoint() as ckpt:
        if ckpt is None:
            return None
        state = read(ckpt)
    if state.get("phase") != phase:
        return None
    mine, theirs = cfg.to_dict(), dict(state.get("config") or {})
    mine.pop("debug"), theirs.pop("debug", None)
    if mine != theirs:
        session.log(f"[resume] ignoring checkpoint {ckpt}: it was written for another configuration")
        return None
    session.log(f"[{phase}] restarting from checkpoint {ckpt}")
    return state


def encoder_weights(checkpoint_dir: Path, which: str) -> dict:
    """The encoder weights to fine-tune from a pre-training checkpoint: the momentum encoder's
    (``which="momentum"``, as the reference) or the online one's; the online one's when the
    run had no momentum encoder."""
    w = read(checkpoint_dir)["weights"]
    use_momentum = which == "momentum" and w["momentum"] is not None
    src, prefix = (w["momentum"], "net.encoder.") if use_momentum else (w["online"], "encoder.")
    return {k[len(prefix):]: v for k, v in src.items() if k.startswith(prefix)}
