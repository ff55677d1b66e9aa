"""Patch masks: BEiT block-wise, random, and SimMIM-style random coarse cells.

Each generator maps a batch's (seed, epoch, image indices) to bool [B, grid*grid] masks (True =
masked) from the counter-based draws of :mod:`conmim.data.rng`, so a mask depends only on
(seed, epoch, image index). Every mask of a generator has exactly ``num_masking`` patches: the
loss then gathers a tensor of fixed shape, with no host round-trip to learn how many rows there
are (``loss_rows``)."""
from __future__ import annotations

import math

import numpy as np
import torch

from conmim.data import rng as crng


def _unpack(ints: list[int], P: int) -> np.ndarray:
    """Python-int bitmasks (bit r * grid + c = patch (r, c)) -> bool [len(ints), P]."""
    nbytes = (P + 7) // 8
    buf = np.frombuffer(b"".join(m.to_bytes(nbytes, "little") for m in ints), np.uint8)
    return np.unpackbits(buf.reshape(len(ints), nbytes), axis=1, bitorder="little")[:, :P].astype(bool)


class BlockMasking:
    """BEiT's block-wise masking: grow rectangular blocks of at least ``min_patches`` patches,
    aspect ratio in [0.3, 1/0.3], until ``round(ratio * P)`` patches are masked.

    BEiT's algorithm, tries and all; each try reads 4 uniforms of the image's stream (size, aspect,
    top, left). A mask is a Python int of grid*grid bits and a block a shifted run of bits, so a
    try costs a few integer operations: 3x (BEiT's 14x14) to 4x (tiny's 4x4) cheaper than the same
    algorithm on numpy arrays with a numpy Generator per image (`benchmarks/input_pipeline.py`,
    "block masks alone", and benchmarks/README.md)."""

    TRIES_PER_BLOCK = 10
    FIRST_DRAW = 12  # tries drawn per image at first (4x4 at 6: 3 on average; 14x14 at 75: 11); 4x more for those needing more

    def __init__(self, grid: int, ratio: float, min_patches: int = 16, min_aspect: float = 0.3):
        self.grid = grid
        self.P = grid * grid
        self.num_masking = int(round(ratio * self.P))
        self.min_patches = min(min_patches, self.num_masking)
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.rows_of = [sum(1 << (grid * i) for i in range(h)) for h in range(grid + 1)]  # bit 0 of h rows
        self.full = (1 << self.P) - 1
        self.col0 = sum(1 << (grid * i) for i in range(grid))
        self.col_last = self.col0 << (grid - 1)

    def _mask(self, u: list):
        """BEiT's loop over blocks on the tries' uniforms ``u``: the mask and its count (short of the
        target when no block fits), or None when the tries need more uniforms than ``u`` holds."""
        G, n, lo, hi = self.grid, self.num_masking, *self.log_aspect
        mask = count = k = 0
        while count < n:
            max_patches = n - count
            delta = 0
            for _ in range(self.TRIES_PER_BLOCK):
                if k + 4 > len(u):
                    return None
                a, b, c, d = u[k: k + 4]
                k += 4
                target = self.min_patches + (max_patches - self.min_patches) * a
                aspect = math.exp(lo + (hi - lo) * b)
                h = int(round(math.sqrt(target * aspect)))
                w = int(round(math.sqrt(target / aspect)))
                if w < G and h < G:
                    top, left = int(c * (G - h + 1)), int(d * (G - w + 1))
                    block = (((1 << w) - 1) << left) * self.rows_of[h] << (G * top)
                    new = h * w - (block & mask).bit_count()
                    if 0 < new <= max_patches:
                        mask |= block
                        delta = new
                        break
            if delta == 0:
                break
            count += delta
        return mask, count

    def _top_up(self, mask: int, count: int, u: list) -> int:
        # BEiT's loop stops when no block fits the remaining budget (on a 14x14 grid at 75 patches
        # a third of the masks end a few patches short): the masked region then grows by random
        # neighbouring patches until the count is exact, keeping the masks contiguous.
        G = self.grid
        for t in u[: self.num_masking - count]:
            near = ((mask << G) | (mask >> G) | ((mask << 1) & ~self.col0) | ((mask >> 1) & ~self.col_last))
            cand = near & self.full & ~mask or self.full & ~mask
            bits = [i for i in range(self.P) if cand >> i & 1]
            mask |= 1 << bits[int(t * len(bits))]
        return mask

    def __call__(self, seed: int, epoch: int, index) -> np.ndarray:
        index = np.asarray(index)
        done = [None] * len(index)
        todo, tries = np.arange(len(index)), self.FIRST_DRAW
        while len(todo):  # (the images whose tries outran their draws: again, with 4x the draws)
            draws = crng.uniforms(seed, epoch, index[todo], crng.MASK, 4 * tries).tolist()
            for j, u in zip(todo, draws):
                done[j] = self._mask(u)
            todo, tries = np.array([j for j in todo if done[j] is None], dtype=np.int64), 4 * tries
        short = [j for j, (_, count) in enumerate(done) if count < self.num_masking]
        if short:
            deficit = self.num_masking - min(done[j][1] for j in short)
            for j, u in zip(short, crng.uniforms(seed, epoch, index[short], crng.MASK_TOP_UP, deficit).tolist()):
                done[j] = (self._top_up(*done[j], u), self.num_masking)
        return _unpack([mask for mask, _ in done], self.P)


class RandomMasking:
    """Exactly ``round(ratio * P)`` patches, uniformly at random."""

    def __init__(self, grid: int, ratio: float):
        self.P = grid * grid
        self.num_masking = int(round(ratio * self.P))

    def __call__(self, seed: int, epoch: int, index) -> np.ndarray:
        return _lowest(crng.uniforms(seed, epoch, index, crng.MASK, self.P), self.num_masking)


def _lowest(u: np.ndarray, k: int) -> np.ndarray:
    """bool [B, n]: True at each row's k smallest uniforms (a uniformly random k-subset)."""
    mask = np.zeros(u.shape, dtype=bool)
    np.put_along_axis(mask, np.argsort(u, axis=1)[:, :k], True, axis=1)
    return mask


class RandomCellMasking:
    """SimMIM: mask random cells of ``cell x cell`` patches (the reference's 32-px cells
    over 16-px patches is cell=2)."""

    def __init__(self, grid: int, ratio: float, cell: int = 2):
        if grid % cell:
            raise ValueError(f"masking.cell_size={cell} must divide the patch grid {grid}")
        self.grid, self.cell = grid, cell
        self.cells = grid // cell
        self.num_cells = int(round(ratio * self.cells ** 2))
        self.num_masking = self.num_cells * cell * cell  # patches

    def __call__(self, seed: int, epoch: int, index) -> np.ndarray:
        m = _lowest(crng.uniforms(seed, epoch, index, crng.MASK, self.cells ** 2), self.num_cells)
        m = m.reshape(-1, self.cells, self.cells).repeat(self.cell, 1).repeat(self.cell, 2)
        return m.reshape(len(m), -1)


class NoMasking:
    num_masking = 0

    def __init__(self, grid: int):
        self.P = grid * grid

    def __call__(self, seed: int, epoch: int, index) -> np.ndarray:
        return np.zeros((len(index), self.P), dtype=bool)


def create_mask_generator(masking, grid: int):
    """Factory by name from a :class:`conmim.config.experiment.MaskingConfig`."""
    if not masking.enabled:
        return NoMasking(grid)
    if masking.type == "block":
        return BlockMasking(grid, masking.ratio, masking.min_block_patches)
    if masking.type == "random":
        return RandomMasking(grid, masking.ratio)
    return RandomCellMasking(grid, masking.ratio, masking.cell_size)


def loss_rows(generator, num_patches: int) -> int:
    """Rows of the loss per image: the masked patches, or every patch when nothing is masked
    (``masking: false``: each patch is predicted from the unmasked view)."""
    return generator.num_masking or num_patches


def masks_for(generator, seed: int, epoch: int, index) -> torch.Tensor:
    """bool [B, P] masks for the images ``index`` of ``epoch``."""
    return torch.from_numpy(generator(seed, epoch, index))
