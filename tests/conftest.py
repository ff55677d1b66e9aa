import sys
from pathlib import Path

import pytest

from conmim.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONMIM = str(Path(sys.executable).with_name("conmim"))

# A few hundred real images, one epoch: every test that trains uses this shape.
SMALL = {
    "data.subset": 256, "data.eval_subset": 256,
    "pretrain.epochs": 1, "pretrain.batch_size": 64, "pretrain.warmup_epochs": 0,
    "finetune.epochs": 1, "finetune.batch_size": 64, "finetune.warmup_epochs": 0,
    "eval.probe_epochs": 2, "resources.cpus_per_worker": 1,
}


def small_cfg(**overrides):
    o = {**SMALL, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return load_config("tiny", [f"{k}={v}" for k, v in o.items()])


@pytest.fixture
def small():
    return small_cfg


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (Ray's own testing advice)."""
    import ray
    from conmim.run.ray_train import ensure_ray
    ensure_ray(num_cpus=4)
    yield ray
    ray.shutdown()
