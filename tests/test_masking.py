import math

import numpy as np
import pytest

from conmim.config.experiment import MaskingConfig
from conmim.data.masking import create_mask_generator, masks_for


@pytest.mark.parametrize("kind,grid,ratio,tol", [
    ("block", 14, 75 / 196, 0.02), ("block", 4, 0.4, 0.04), ("random", 14, 0.6, 0.0),
    ("random_cells", 14, 0.75, 0.0), ("random_cells", 4, 0.5, 0.0)])
def test_each_mask_type_hits_its_ratio(kind, grid, ratio, tol):
    cfg = MaskingConfig(type=kind, ratio=ratio, min_block_patches=16 if grid == 14 else 2,
                        cell_size=2 if grid % 2 == 0 else 1)
    gen = create_mask_generator(cfg, grid)
    masks = masks_for(gen, seed=0, epoch=0, index=np.arange(300)).numpy()
    assert masks.shape == (300, grid * grid)
    expect = round(ratio * grid * grid) / (grid * grid) if kind != "random_cells" else \
        round(ratio * (grid // 2) ** 2) / (grid // 2) ** 2
    assert abs(masks.mean() - expect) <= tol + 1e-9
    units = (grid // 2) ** 2 if kind == "random_cells" else grid * grid
    possible = math.comb(units, round(expect * units))
    assert len({m.tobytes() for m in masks}) >= min(50, possible)  # masks differ between images


def test_random_cells_mask_whole_cells():
    gen = create_mask_generator(MaskingConfig(type="random_cells", ratio=0.5, cell_size=2), 14)
    m = masks_for(gen, 0, 0, np.arange(5)).numpy().reshape(5, 7, 2, 7, 2)
    assert (m.min(axis=(2, 4)) == m.max(axis=(2, 4))).all()


def test_block_masks_are_contiguous_blocks():
    gen = create_mask_generator(MaskingConfig(type="block", ratio=0.4, min_block_patches=16), 14)
    m = masks_for(gen, 0, 0, np.arange(50)).numpy().reshape(50, 14, 14)
    # a masked patch of a block mask nearly always has a masked 4-neighbour
    nb = np.zeros_like(m)
    nb[:, 1:] |= m[:, :-1]; nb[:, :-1] |= m[:, 1:]; nb[:, :, 1:] |= m[:, :, :-1]; nb[:, :, :-1] |= m[:, :, 1:]
    assert (m & nb).sum() / m.sum() > 0.95


def test_masking_false_gives_all_false_mask_and_masks_are_deterministic():
    gen = create_mask_generator(MaskingConfig(enabled=False), 4)
    assert not masks_for(gen, 0, 0, np.arange(8)).any()
    gen = create_mask_generator(MaskingConfig(type="block", ratio=0.4, min_block_patches=2), 4)
    a = masks_for(gen, 1, 2, np.array([5, 9]))
    b = masks_for(gen, 1, 2, np.array([9]))
    assert (a[1] == b[0]).all()
    assert not (masks_for(gen, 1, 3, np.arange(20)) == masks_for(gen, 1, 2, np.arange(20))).all()
