"""Per-iteration schedules (BEiT/DINO style): values for every optimiser step of a run, so a
restarted run indexes the same schedule at its saved step."""
from __future__ import annotations

import math

import numpy as np


def cosine(base: float, final: float, total_steps: int, warmup_steps: int = 0, start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``start`` to ``base``, then cosine to ``final`` at the last step."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(int(warmup_steps), total_steps)
    warm = np.linspace(start, base, warmup_steps, endpoint=False) if warmup_steps else np.array([])
    n = total_steps - warmup_steps
    t = np.arange(n) / max(n - 1, 1)
    decay = final + 0.5 * (base - final) * (1 + np.cos(math.pi * t))
    return np.concatenate([warm, decay])


def momentum(m: float, total_steps: int) -> np.ndarray:
    """Cosine from m at the first step to exactly 1.0 at the last."""
    return cosine(m, 1.0, total_steps)


def scaled_lr(lr: float, batch_size: int, lr_batch_size: int) -> float:
    """The linear scaling rule: lr is quoted for lr_batch_size images per step."""
    return lr * batch_size / lr_batch_size
