"""A paper-shaped rehearsal: the ``vit-b16-imagenet`` preset, shrunk to 32² images and a few
hundred of them, on Parquet shards written by the project's ImageNet converter, on 2 Ray Train
workers (gloo) with gradient accumulation; one worker is SIGKILLed mid-pre-training, the trial
resumes from its checkpoint and runs to the end, through the distributed probes and fine-tuning.
What the paper-scale run does, except its sizes."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from conmim.config import load_config
from conmim.config.experiment import DataConfig
from conmim.data.sources import load_splits

pytestmark = pytest.mark.slow

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 32, 8
SHRUNK = {  # the preset's sizes, shrunk; everything else is the preset's (BEiT ViT, shared relative
    # position bias, layer scale, block masking, momentum target, mixup/cutmix/RandAugment fine-tuning)
    "model.img_size": 32, "model.patch_size": 8, "model.embed_dim": 64, "model.depth": 2, "model.num_heads": 2,
    "model.projector_hidden": 128, "model.projector_out": 64, "masking.min_block_patches": 2,
    "data.num_workers": 1,
    "pretrain.epochs": 3, "pretrain.batch_size": 64, "pretrain.lr_batch_size": 64, "pretrain.warmup_epochs": 1,
    "pretrain.accumulate": 2, "pretrain.amp": False, "pretrain.checkpoint_every": 1,
    "finetune.epochs": 1, "finetune.batch_size": 64, "finetune.lr_batch_size": 64, "finetune.warmup_epochs": 0,
    "finetune.amp": False, "eval.probe_epochs": 5, "eval.proxy_every": 1, "eval.probe_train_per_class": 16,
    "resources.num_workers": 2, "resources.use_gpu": False, "resources.gpus_per_worker": 0,
    "resources.cpus_per_worker": 1, "resources.collective_timeout_s": 60,
    "debug.kill_at_step": 6,  # 4 optimiser steps an epoch: SIGKILL in epoch 2, after epoch 1's checkpoint
}


def imagenet_like_folder(root):
    """ImageNet's layout (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) of 32² RGB JPEGs from Fashion-MNIST."""
    from PIL import Image
    base = load_splits(DataConfig(name="fashion-mnist", val_size=0))
    for split, images, per_class in (("train", base["train"], TRAIN_PER_CLASS), ("val", base["test"], VAL_PER_CLASS)):
        for c in range(CLASSES):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in np.flatnonzero(images.labels == c)[:per_class]:
                img = Image.fromarray(images.pixels[i, 0].numpy()).convert("RGB").resize((32, 32), Image.BICUBIC)
                img.save(d / f"{split}_{i}.JPEG", quality=95)
    return root


def test_paper_shaped_rehearsal_survives_a_killed_worker(ray_session, tmp_path):
    from conmim.run.ray_train import run_trial
    raw = imagenet_like_folder(tmp_path / "raw")
    shards = tmp_path / "shards"
    p = subprocess.run([sys.executable, str(REPO / "cluster" / "imagenet_parquet.py"), "shards", str(raw), str(shards),
                        "--workers", "1", "--images-per-shard", "64"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    manifest = json.loads((shards / "_manifest.json").read_text())
    assert manifest["classes"] == CLASSES and len(list(shards.glob("*.parquet"))) > 2

    cfg = load_config("vit-b16-imagenet", ["data.name=parquet", f"data.root={shards}",
                                           *(f"{k}={v}" for k, v in SHRUNK.items())])
    assert cfg.model.name.startswith("beit_") and cfg.model.shared_rel_pos_bias and cfg.micro_batch("pretrain") == 16
    out = tmp_path / "trial"
    res = run_trial(cfg, out)

    assert "SIGKILLed at step 6" in (out / ".kill_injected").read_text()
    h = res.pretrain_history
    assert [e["epoch"] for e in h] == [1, 2, 3] and [e["step"] for e in h] == [4, 8, 12]
    assert [e.get("resumed_from_step") for e in h] == [None, 4, None]  # epoch 2 again, from epoch 1's checkpoint
    assert all(0 <= e["knn_proxy_top1"] <= 1 for e in h)
    log = (out / "train.log").read_text()
    # the probes ran on both ranks: 16 images of each class for the bank / linear probe, the whole test split
    assert f"features of {16 * CLASSES} training + {VAL_PER_CLASS * CLASSES} test images on 2 rank(s)" in log
    for k in ("knn_top1", "linear_probe_top1", "finetune_top1"):
        assert 0 <= res.metrics[k] <= 1, k
    assert res.metrics["finetune_top1"] > 1 / CLASSES  # it learned something
    assert json.loads((out / "result.json").read_text())["finetune_top1"] == res.metrics["finetune_top1"]
