"""Ray Train: several workers give one process's answer, and a dead worker costs nothing."""
import json
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from conmim.train import schedules
from conmim.run.ray_train import pretrain_phase
from conftest import CONMIM, SMALL, session_actors

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_two_workers_match_one_worker_with_sync_bn(ray_session, small, tmp_path):
    B = 32
    common = dict(data__subset=20 * B, pretrain__batch_size=B, pretrain__lr_batch_size=B, pretrain__sync_bn=True,
                  debug__log_steps=True, debug__dump_replicas=True, objective__dictionary="image",
                  pretrain__warmup_epochs=0.2, debug__float64=True)
    one, _ = pretrain_phase(small(resources__num_workers=1, **common), tmp_path / "w1")
    two, _ = pretrain_phase(small(resources__num_workers=2, **common), tmp_path / "w2")
    assert len(one["step_losses"]) == len(two["step_losses"]) == 20
    for a, b in zip(one["step_losses"], two["step_losses"]):
        assert abs(a - b) < 1e-4, (a, b)
    assert one["step_losses"][-1] < one["step_losses"][0]  # it learned something
    r0 = torch.load(tmp_path / "w2" / "replicas" / "rank0.pt")
    r1 = torch.load(tmp_path / "w2" / "replicas" / "rank1.pt")
    assert r0.keys() == r1.keys() and any(k.startswith("momentum.") for k in r0)
    for k in r0:  # online *and* momentum encoders identical on both workers
        assert torch.equal(r0[k], r1[k]), k
    # (weights of the one-worker run are not compared: parameters whose gradient is ~0, e.g. the
    # final LayerNorm bias before the projector's BatchNorm, take AdamW's sign-like steps on
    # round-off, even in float64; the losses above are the observable that must agree)
    # the local Ray ran both Train runs without a preemption watcher (no spot nodes on one machine)
    started = {a.class_name for a in session_actors()}
    assert "TrainController" in started and "RayTrainWorker" in started, started
    assert "PreemptionWatcher" not in started, started
    # nor Ray Data's DatasetManager: conmim passes Ray Train no Ray Dataset (ray_train._without_dataset_manager)
    assert "DatasetManager" not in started, started


@pytest.mark.timeout(600)
def test_worker_deaths_resume_from_checkpoint_with_schedules_intact(ray_session, small, tmp_path):
    """Two real process deaths in one trial: os._exit mid-epoch 2, then SIGKILL (what `kill -9` or
    the OOM killer does) mid-epoch 3. Each time Ray Train starts a new worker that resumes from the
    latest checkpoint, the schedules go on from the saved step, and the trial still fine-tunes."""
    from conmim.run.ray_train import run_trial
    cfg = small(pretrain__epochs=3, data__subset=256, pretrain__batch_size=64, pretrain__checkpoint_every=1,
                debug__crash_at_step=6, debug__kill_at_step=10)  # 4 steps per epoch
    before = set(Path(tempfile.gettempdir()).iterdir())
    res = run_trial(cfg, tmp_path)
    # a restart reads its checkpoint where Ray stored it: no copy of it is left in the temp folder
    copies = [p for p in set(Path(tempfile.gettempdir()).iterdir()) - before if p.is_dir() and any(p.rglob("state.pt"))]
    assert not copies, copies
    assert "died at step 6" in (tmp_path / ".crash_injected").read_text()
    assert "SIGKILLed at step 10" in (tmp_path / ".kill_injected").read_text()
    h = res.pretrain_history
    assert [e["epoch"] for e in h] == [1, 2, 3] and [e["step"] for e in h] == [4, 8, 12]
    assert [e.get("resumed_from_step") for e in h] == [None, 4, 8]  # from the checkpoints, not from 0
    lr = schedules.cosine(schedules.scaled_lr(cfg.pretrain.lr, 64, cfg.pretrain.lr_batch_size),
                          cfg.pretrain.min_lr, 12, int(cfg.pretrain.warmup_epochs * 4))
    m = schedules.momentum(cfg.objective.momentum, 12)
    for e in h:
        assert e["lr"] == pytest.approx(lr[e["step"] - 1]) and e["momentum"] == pytest.approx(m[e["step"] - 1])
    states = [torch.load(p, weights_only=False) for p in tmp_path.glob("ray/*/checkpoint_*/state.pt")]
    last = max((s for s in states if s["phase"] == "pretrain"), key=lambda s: s["step"])
    assert last["step"] == 12 and last["epoch"] == 3
    assert 0 < res.metrics["finetune_top1"] <= 1
    assert json.loads((tmp_path / "result.json").read_text())["finetune_top1"] == res.metrics["finetune_top1"]
    # the local Ray this project starts serves its dashboard on loopback only
    assert ray_session._private.worker.global_worker.node.address_info["webui_url"].startswith("127.0.0.1:")


@pytest.mark.timeout(900)
def test_cli_train_on_ray_writes_result_once(tmp_path):
    sets = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]
    p = subprocess.run([CONMIM, "train", "tiny", *sets, "--set", "resources.num_workers=2", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["finetune_top1"] > 0.1 and r["config"]["resources"]["num_workers"] == 2
    assert [e["epoch"] for e in r["pretrain_history"]] == [1]
    assert list(tmp_path.glob("*.json")) == [tmp_path / "result.json"]


def test_a_worker_exception_comes_back_typed(ray_session, small, tmp_path):
    """An exception in a worker reaches the sweep as a TrialFailure (type, message, phase) read
    from what the worker recorded, not by searching Ray's traceback text."""
    from conmim.run.ray_train import TrialRunFailed, run_trial
    cfg = small(pretrain__batch_size=4096, pretrain__lr_batch_size=4096, resources__max_failures=0)
    with pytest.raises(TrialRunFailed) as e:
        run_trial(cfg, tmp_path)
    f = e.value.failure
    assert (f.kind, f.error_type, f.phase) == ("error", "ValueError", "trial"), f
    assert "pretrain.batch_size=4096 is larger than the 256 training images" in f.message
    assert f.reason == f"ValueError: {f.message}"
