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


@pytest.mark.parametrize("kind,grid,ratio,min_block,cell", [
    ("block", 14, 75 / 196, 16, 2), ("block", 4, 0.4, 2, 2), ("random", 14, 0.6, 16, 2),
    ("random_cells", 14, 0.75, 16, 2)])
def test_every_mask_has_exactly_num_masking_patches(kind, grid, ratio, min_block, cell):
    """A fixed count per image (the loss then has a fixed shape: no host round-trip per step).
    BEiT's block loop alone ends a few patches short on a third of 14x14 masks; the top-up grows
    the masked region by neighbouring patches, so the masks stay contiguous."""
    from conmim.data.masking import loss_rows
    gen = create_mask_generator(MaskingConfig(type=kind, ratio=ratio, min_block_patches=min_block, cell_size=cell), grid)
    masks = masks_for(gen, seed=0, epoch=0, index=np.arange(1000)).numpy()
    assert set(masks.sum(1)) == {gen.num_masking} and loss_rows(gen, grid * grid) == gen.num_masking
    if kind == "block" and grid == 14:  # (on 4x4, blocks of one patch are BEiT's own: 2 %)
        m = masks.reshape(-1, grid, grid)
        nb = np.zeros_like(m)
        nb[:, 1:] |= m[:, :-1]; nb[:, :-1] |= m[:, 1:]; nb[:, :, 1:] |= m[:, :, :-1]; nb[:, :, :-1] |= m[:, :, 1:]
        assert (m & ~nb).sum() / m.sum() < 0.01  # (isolated patches: only from blocks of one patch)
    off = create_mask_generator(MaskingConfig(enabled=False), grid)
    assert loss_rows(off, grid * grid) == grid * grid


def beit_block_mask(grid, num_masking, min_patches, u, top_up):
    """BEiT's block masking as its reference code writes it (numpy arrays, a loop of tries per
    block), reading the same uniforms in the same order (4 per try), then the top-up."""
    mask = np.zeros((grid, grid), dtype=bool)
    lo, hi = math.log(0.3), math.log(1 / 0.3)
    u, count = iter(u), 0
    while count < num_masking:
        max_patches, delta = num_masking - count, 0
        for _ in range(10):
            a, b, c, d = next(u), next(u), next(u), next(u)
            target = min_patches + (max_patches - min_patches) * a
            aspect = math.exp(lo + (hi - lo) * b)
            h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if w < grid and h < grid:
                top, left = int(c * (grid - h + 1)), int(d * (grid - w + 1))
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_patches:
                    delta = h * w - num_masked
                    mask[top: top + h, left: left + w] = True
                    break
        if delta == 0:
            break
        count += delta
    for t in top_up[: num_masking - count]:
        near = np.zeros_like(mask)
        near[1:] |= mask[:-1]; near[:-1] |= mask[1:]; near[:, 1:] |= mask[:, :-1]; near[:, :-1] |= mask[:, 1:]
        cand = np.flatnonzero(near & ~mask)
        cand = cand if len(cand) else np.flatnonzero(~mask)
        mask.flat[cand[int(t * len(cand))]] = True
    return mask.reshape(-1)


@pytest.mark.parametrize("grid,ratio,min_block", [(14, 75 / 196, 16), (4, 0.4, 2), (14, 0.6, 4)])
def test_block_masks_equal_beits_algorithm_on_the_same_draws(grid, ratio, min_block, monkeypatch):
    """The bitmask implementation is BEiT's algorithm: the same masks as the array version above,
    draw for draw; and the same again when every image's tries run past the first draws
    (FIRST_DRAW = 1), so that the images are drawn for again, with more of their streams."""
    from conmim.data import rng as crng
    from conmim.data.masking import BlockMasking
    gen = create_mask_generator(MaskingConfig(type="block", ratio=ratio, min_block_patches=min_block), grid)
    idx = np.arange(200)
    ours = masks_for(gen, 5, 1, idx).numpy()
    u = crng.uniforms(5, 1, idx, crng.MASK, 4000)
    t = crng.uniforms(5, 1, idx, crng.MASK_TOP_UP, gen.num_masking)
    ref = np.stack([beit_block_mask(grid, gen.num_masking, gen.min_patches, u[i], t[i]) for i in idx])
    assert (ours == ref).all()
    monkeypatch.setattr(BlockMasking, "FIRST_DRAW", 1)
    assert (masks_for(gen, 5, 1, idx).numpy() == ref).all()
