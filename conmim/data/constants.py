"""Small host-made constants (luma weights, normalisation, bicubic taps) on the views' device.

A copy from the host to a GPU with ``non_blocking=False`` - what ``t.to(x)`` and
``torch.tensor(..., device=x.device)`` do - synchronises the stream: the host waits for every
queued kernel before it can queue the next, so the loop cannot run ahead of the GPU. Each
constant is copied once per device and dtype, then reused."""
from __future__ import annotations

import torch

_ON_DEVICE: dict = {}


def like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The host constant ``t`` with ``x``'s device and dtype (on the host itself, plainly converted)."""
    if x.device.type == "cpu":
        return t.to(x.dtype)
    key = (tuple(t.reshape(-1).tolist()), tuple(t.shape), x.device, x.dtype)  # (by value: ids are reused)
    out = _ON_DEVICE.get(key)
    if out is None:
        out = _ON_DEVICE[key] = t.to(device=x.device, dtype=x.dtype)
    return out
