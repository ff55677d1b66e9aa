"""The pieces of the study protocol (issue 15): low-label fine-tuning on the same labels for every
trial of a seed, probes of both encoders, and the positional-shortcut diagnostics."""
import math

import numpy as np
import pytest
import torch

from conmim.data.sources import labelled_subset, load_splits
from conmim.train.build import build_conmim
from conmim.train.diagnostics import shortcut_diagnostics
from conmim.trial import run_in_process


def test_labelled_subset_is_class_balanced_and_a_function_of_the_seed(small):
    labels = load_splits(small().data)["train"].labels
    a = labelled_subset(labels, 7, seed=0)
    assert np.bincount(labels[a]).tolist() == [7] * 10 and len(set(a)) == 70
    assert np.array_equal(a, labelled_subset(labels, 7, seed=0))  # every trial of seed 0: the same images
    assert not np.array_equal(a, labelled_subset(labels, 7, seed=1))
    rare = np.array([0, 0, 1, 1, 1, 1])
    assert np.bincount(rare[labelled_subset(rare, 3, 0)]).tolist() == [2, 3]  # a class with fewer: all of it


def test_a_network_that_only_sees_position_is_flagged_and_a_random_one_is_not(small):
    cfg = small()
    val = load_splits(cfg.data)["val"]
    P = cfg.model.grid ** 2
    torch.manual_seed(0)
    fresh = build_conmim(cfg)
    d = shortcut_diagnostics(fresh, val, cfg.model.img_size, "cpu", n=128)
    assert abs(d["all_masked_loss"] - math.log(P)) < 0.15 * math.log(P) and not d["positional_shortcut"], d
    assert d["position_spread"] > 0.3
    # an encoder whose output is its position embedding alone (content and blocks silenced): both
    # views map a patch to the same feature whatever the image, the all-masked task is solved
    cheat = build_conmim(cfg)
    vit = cheat.online.encoder.vit
    with torch.no_grad():
        for name, p in cheat.online.encoder.named_parameters():
            if "pos_embed" not in name and not name.startswith("vit.norm"):
                p.zero_()
        vit.pos_embed.normal_(0, 1)
        cheat.momentum.net.load_state_dict(cheat.online.state_dict())
    d = shortcut_diagnostics(cheat, val, cfg.model.img_size, "cpu", n=128)
    assert d["all_masked_loss"] < 0.1 * math.log(P) and d["positional_shortcut"], d
    assert d["position_spread"] < 0.05, d


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_a_low_label_trial_reports_both_fine_tunes_and_both_encoders(small, tmp_path):
    cfg = small(finetune__labels_per_class=10, finetune__batch_size=32, eval__full_label_finetune=True,
                eval__probe_online=True, eval__proxy_every=1)
    r = run_in_process(cfg, tmp_path)
    m = r.metrics
    for k in ("finetune_top1", "finetune_full_top1", "finetune_val_top1", "finetune_full_val_top1", "knn_top1",
              "knn_online_top1", "linear_probe_online_top1"):
        assert 0 <= m[k] <= 1, (k, m[k])  # fractions of the split, not percentages or losses
    assert m["knn_top1"] > 0.2 and m["knn_online_top1"] > 0.2, m  # k-NN on Fashion-MNIST: far above chance (0.1)
    P = cfg.model.grid ** 2  # the all-masked task is a choice among P positions: log P at chance
    assert 0 < m["all_masked_loss"] < 2 * math.log(P) and 0 < m["position_spread"] <= 1.5, m
    assert r.probe_encoder == "momentum" and m["knn_online_top1"] != m["knn_top1"]
    assert "knn_proxy_online_top1" in r.pretrain_history[-1] and "knn_proxy_top1" in r.pretrain_history[-1]
    phases = {k for h in r.finetune_history for k in h if k.endswith("_loss")}
    assert phases == {"finetune_loss", "finetune_full_loss"}
    shared = run_in_process(small(objective__target_encoder="shared", eval__probe_online=True), tmp_path / "s")
    assert shared.probe_encoder == "online" and shared.metrics["knn_online_top1"] == shared.metrics["knn_top1"]
