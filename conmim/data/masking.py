"""Patch masks: BEiT block-wise, random, and SimMIM-style random coarse cells.

Each generator maps a per-image numpy Generator to a bool [grid*grid] mask (True = masked),
so a mask depends only on (seed, epoch, image index). Every mask of a generator has exactly
``num_masking`` patches: the loss then gathers a tensor of fixed shape, with no host round-trip
to learn how many rows there are (``loss_rows``)."""
from __future__ import annotations

import math

import numpy as np
import torch

from conmim.data import rng as crng


class BlockMasking:
    """BEiT's block-wise masking: grow rectangular blocks of at least ``min_patches`` patches,
    aspect ratio in [0.3, 1/0.3], until ``round(ratio * P)`` patches are masked."""

    def __init__(self, grid: int, ratio: float, min_patches: int = 16, min_aspect: float = 0.3):
        self.grid = grid
        self.num_masking = int(round(ratio * grid * grid))
        self.min_patches = min(min_patches, self.num_masking)
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _grow(self, mask: np.ndarray, max_patches: int, g: np.random.Generator) -> int:
        delta = 0
        for _ in range(10):
            target = self.min_patches + (max_patches - self.min_patches) * g.random()  # random.uniform semantics
            aspect = math.exp(g.uniform(*self.log_aspect))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < self.grid and h < self.grid:
                top = int(g.integers(0, self.grid - h + 1))
                left = int(g.integers(0, self.grid - w + 1))
                block = mask[top: top + h, left: left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_patches:
                    block[...] = True  # (a view: masks the block in place)
                    delta = new
                if delta > 0:
                    break
        return delta

    def __call__(self, g: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.grid, self.grid), dtype=bool)
        count = 0
        while count < self.num_masking:
            max_patches = self.num_masking - count
            delta = self._grow(mask, max_patches, g)
            if delta == 0:
                break
            count += delta
        # BEiT's loop stops when no block fits the remaining budget (on a 14x14 grid at 75 patches
        # a third of the masks end a few patches short): the masked region then grows by random
        # neighbouring patches until the count is exact, keeping the masks contiguous.
        while count < self.num_masking:
            near = np.zeros_like(mask)
            near[1:] |= mask[:-1]
            near[:-1] |= mask[1:]
            near[:, 1:] |= mask[:, :-1]
            near[:, :-1] |= mask[:, 1:]
            cand = np.flatnonzero(near & ~mask)
            mask.flat[g.choice(cand if len(cand) else np.flatnonzero(~mask))] = True
            count += 1
        return mask.reshape(-1)


class RandomMasking:
    """Exactly ``round(ratio * P)`` patches, uniformly at random."""

    def __init__(self, grid: int, ratio: float):
        self.P = grid * grid
        self.num_masking = int(round(ratio * self.P))

    def __call__(self, g: np.random.Generator) -> np.ndarray:
        mask = np.zeros(self.P, dtype=bool)
        mask[g.permutation(self.P)[: self.num_masking]] = True
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

    def __call__(self, g: np.random.Generator) -> np.ndarray:
        m = np.zeros(self.cells ** 2, dtype=bool)
        m[g.permutation(self.cells ** 2)[: self.num_cells]] = True
        m = m.reshape(self.cells, self.cells).repeat(self.cell, 0).repeat(self.cell, 1)
        return m.reshape(-1)


class NoMasking:
    num_masking = 0

    def __init__(self, grid: int):
        self.P = grid * grid

    def __call__(self, g: np.random.Generator) -> np.ndarray:
        return np.zeros(self.P, dtype=bool)


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
    gens = crng.generators(seed, epoch, index, crng.MASK)
    return torch.from_numpy(np.stack([generator(g) for g in gens]))
