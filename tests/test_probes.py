"""The probes scale with the trial: every rank extracts a share of the features, the shares are
gathered in order (the numbers one rank computes alone), every rank fits, and no rank waits in a
collective longer than ``resources.collective_timeout_s``."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import small_cfg
from conmim.data.sources import load_splits
from conmim.train.build import build_encoder
from conmim.train.evaluate import extract, probe_train_set, probes
from conmim.train.session import LocalSession, init_process_group

SIZES = (200, 100)  # 64-image batches: 200 -> 4 batches over 3 ranks (2, 1, 1); 100 -> 2 (rank 2 gets none)


def _features(cfg, session=None):
    torch.manual_seed(0)
    encoder = build_encoder(cfg)
    splits = load_splits(cfg.data)
    feats = [extract(encoder, splits["val"].take(np.arange(n)), cfg, "cpu", batch_size=64, session=session)
             for n in SIZES]
    return {"feats": feats, "probes": probes(encoder, splits, cfg, "cpu", session=session)}


def _rank(rank, world, init, out):
    torch.set_num_threads(1)
    init_process_group("gloo", init, rank, world, 120)
    try:
        res = _features(small_cfg(data__num_workers=1, eval__probe_train_per_class=20), LocalSession(out, "probe"))
        torch.save(res, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # (two gloo ranks spawned: ~35 s)
def test_features_split_over_ranks_and_gathered_are_the_single_rank_features(tmp_path):
    world = 3
    mp.spawn(_rank, args=(world, f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=world, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _features(small_cfg(eval__probe_train_per_class=20))  # one rank, no loader workers
    finally:
        torch.set_num_threads(threads)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for n, a, b in zip(SIZES, got["feats"], one["feats"]):
            assert a.shape == (n, 128) and torch.equal(a, b), (rank, n)  # every rank holds all rows, in order
        assert got["probes"] == one["probes"]  # and fits the same probes
    assert set(one["probes"]) == {"knn_top1", "linear_probe_top1"}


def test_probe_training_subset_is_fixed_and_class_balanced():
    full = load_splits(small_cfg().data)["train"]
    a = probe_train_set(full, small_cfg(eval__probe_train_per_class=7))
    b = probe_train_set(full, small_cfg(eval__probe_train_per_class=7, seed=3))
    assert len(a) == 70 and np.bincount(a.labels).tolist() == [7] * 10
    assert torch.equal(a.pixels, b.pixels)  # the same images whatever the trial's seed
    assert probe_train_set(full, small_cfg()) is full  # null: the whole split


def test_collective_timeout_reaches_ray_train():
    from conmim.run.ray_train import _trainer
    from pathlib import Path
    trainer = _trainer(small_cfg(resources__collective_timeout_s=42), Path("/tmp/unused"), "trial", None)
    assert trainer.backend_config.timeout_s == 42


TINY_TIMEOUT_S = 5


@pytest.mark.slow
def test_a_long_probe_phase_outlives_a_tiny_collective_timeout(ray_session, small, tmp_path):
    """A probe phase several times longer than resources.collective_timeout_s: with rank 0 probing
    alone while rank 1 waited in a barrier (the old design) rank 1 gave up after the timeout and the
    trial failed (max_failures=0); every rank probing, none waits, and the trial finishes."""
    from conmim.run.ray_train import run_trial
    cfg = small(resources__num_workers=2, resources__collective_timeout_s=TINY_TIMEOUT_S, resources__max_failures=0,
                eval__probe_epochs=10000)  # the linear probe's fit: the long part, on every rank at once
    res = run_trial(cfg, tmp_path)
    assert res.timings["probe_seconds"] > 2 * TINY_TIMEOUT_S, res.timings  # long next to the timeout
    assert "features of 256 training + 256 test images on 2 rank(s)" in (tmp_path / "train.log").read_text()
    for k in ("knn_top1", "linear_probe_top1", "knn_online_top1", "linear_probe_online_top1", "finetune_top1"):
        assert 0 <= res.metrics[k] <= 1, k
