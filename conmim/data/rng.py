"""Counter-based randomness: every random draw of an image is a pure function of
(seed, epoch, image index, stream), so augmentations and masks do not depend on how the
data is split over workers, on batch composition, or on the order of loading."""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

# Streams keep the draws of different consumers independent of each other.
GEOMETRY, BASIC_VIEW, STRONG_VIEW, STRONG_VIEW_2, MASK, FINETUNE, MASK_TOP_UP = range(7)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """(uint64 arithmetic wraps around: the callers silence numpy's overflow warning once)"""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def keys(seed: int, epoch: int, index: np.ndarray, stream: int) -> np.ndarray:
    """One 64-bit key per image, a hash of (seed, epoch, index, stream)."""
    with np.errstate(over="ignore"):
        k = _splitmix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        k = _splitmix64(k ^ np.uint64(epoch & 0xFFFFFFFF))
        k = _splitmix64(k ^ np.uint64(stream))
        return _splitmix64(k ^ np.asarray(index, dtype=np.uint64))


def uniforms(seed: int, epoch: int, index, stream: int, n: int, start: int = 0) -> np.ndarray:
    """[len(index), n] float64 uniforms in [0, 1): draws ``start`` .. ``start + n - 1`` of each
    image's stream (any stretch of a stream can be drawn without the ones before it)."""
    k = keys(seed, epoch, np.asarray(index), stream)
    with np.errstate(over="ignore"):
        x = _splitmix64(k[:, None] * np.uint64(1000003) + np.arange(start, start + n, dtype=np.uint64)[None, :])
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
