"""``objective.dictionary: batch`` across workers: each worker's negatives are the patches of its
own (micro-)batch, the paper's *intra-GPU* dictionary (README's knob table, ``dictionary_size``).
Keys are not gathered across ranks, so two ranks are exactly one process cutting the same global
batch into two micro-batches (``pretrain.accumulate: 2``, BatchNorm per micro-batch alike)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import small_cfg
from conmim.train.pretrain import pretrain
from conmim.train.session import LocalSession, init_process_group
from test_accumulate import PRETRAIN, TOL, _same_run

BATCH = {**PRETRAIN, "objective__dictionary": "batch"}  # float64, per-step losses, per-worker BatchNorm


def _rank(rank, world, init, out):
    torch.set_num_threads(1)
    init_process_group("gloo", init, rank, world, 120)
    try:
        res = pretrain(small_cfg(**BATCH), LocalSession(f"{out}/rank{rank}", "pretrain"))
        res.pop("net")
        torch.save(res, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # (two gloo ranks spawned)
def test_batch_dictionary_on_two_ranks_is_each_ranks_own_batch(tmp_path):
    world = 2
    mp.spawn(_rank, args=(world, f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=world, join=True)
    two = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_micro_batch = pretrain(small_cfg(**BATCH, pretrain__accumulate=2), LocalSession(tmp_path / "acc2", "pretrain"))
    finally:
        torch.set_num_threads(threads)
    assert len(two[0]["step_losses"]) == 4  # 256 images, global batch 64
    for res in two:  # every rank reports the global loss, which is the one process's, step by step
        assert _same_run(res, per_micro_batch) < TOL
    # the chance level the divergence flag uses is ln of this per-worker dictionary
    cfg = small_cfg(**BATCH, resources__num_workers=2)
    assert cfg.dictionary_size() == 16 * 32
