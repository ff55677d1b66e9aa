"""What a sweep records of how a trial ended, at unit level: the flags of a trial whose numbers
lie (collapsed, at chance, diverged) and the ``conmim.warning`` tag its FINISHED MLflow run gets.
(The end-to-end failures, FAILED runs with their reasons, are in
test_sweep.py::test_sweep_logs_every_trial_once_and_reports.)"""
import pytest

from conftest import small_cfg
from conmim.run.tune_trial import warning_tag
from conmim.tracking import tags as T
from conmim.trial import make_result, trial_warnings

COLLAPSED = "collapsed pre-training"
AT_CHANCE = "fine-tuned top-1 at chance"
DIVERGED = "pre-training diverged (loss above chance after warm-up)"


def _result(target_std=0.9, top1=0.8, losses=(2.0,), warmup_epochs=0):
    """The record a trial's worker makes (``trial.make_result``) from its phases' summaries."""
    cfg = small_cfg(pretrain__epochs=len(losses), pretrain__warmup_epochs=warmup_epochs)
    history = [{"epoch": i + 1, "pretrain_loss": x} for i, x in enumerate(losses)]
    carry = {"pre": {"history": history, "final_pretrain_loss": losses[-1], "final_target_std": target_std},
             "probe": {"knn_top1": top1, "linear_probe_top1": top1},
             "ft": {"finetune_top1": top1, "finetune_seconds": 1.0, "finetune_history": []},
             "pretrain_seconds": 1.0, "probe_seconds": 1.0}
    return make_result(cfg, carry, num_classes=10)


def test_the_tag_is_conmim_warning():
    assert T.WARNING == "conmim.warning"  # the name README and docs/reliability.md promise


@pytest.mark.parametrize("kw, flags, said", [
    ({}, set(), []),  # healthy: no flag, no tag
    ({"target_std": 0.05}, {"collapsed"}, [COLLAPSED]),  # spread < 0.1
    ({"top1": 0.12}, {"at_chance"}, [AT_CHANCE]),  # 10 classes: within 5 points of 0.1
    ({"target_std": 0.05, "top1": 0.12}, {"collapsed", "at_chance"}, [COLLAPSED]),  # chance follows from collapse
    ({"losses": (2.0, 9.0, 3.0)}, {"diverged"}, [DIVERGED]),  # above ln 16 after warm-up
    ({"losses": (9.0, 2.0), "warmup_epochs": 1}, set(), []),  # above chance only during warm-up
    ({"losses": (2.0, float("nan"))}, {"diverged"}, [DIVERGED]),
    ({"target_std": 0.05, "losses": (2.0, 9.0)}, {"collapsed", "diverged"}, [COLLAPSED, DIVERGED]),
])
def test_flags_of_a_trial_and_their_words(kw, flags, said):
    res = _result(**kw)
    assert {k for k, v in res.flags.items() if v} == flags
    assert trial_warnings(res.flags) == said


def test_a_finished_trials_warning_tag_says_each_flag_after_the_datas_warnings():
    """What tune_trial sets as ``conmim.warning`` on the FINISHED run: nothing for a healthy trial
    (even with data warnings, which the run was tagged with when it started), else the data's
    warnings then the flags, '; '-joined and cut to MLflow's tag limit."""
    healthy = _result()
    healthy.warnings = ["few images: class 3 has 4"]
    assert warning_tag(healthy) == ""
    collapsed = _result(target_std=0.05, top1=0.12)
    assert warning_tag(collapsed) == COLLAPSED
    collapsed.warnings = ["few images: class 3 has 4"]
    assert warning_tag(collapsed) == f"few images: class 3 has 4; {COLLAPSED}"
    assert warning_tag(_result(top1=0.11)) == AT_CHANCE
    assert warning_tag(_result(losses=(2.0, 9.0))) == DIVERGED
    long = _result(target_std=0.05)
    long.warnings = ["x" * 6000]
    assert len(warning_tag(long)) == 5000


def test_a_trial_records_the_machine_its_numbers_depend_on(tmp_path):
    """The same config and commit reproduce a trial to the bit only on a CPU whose torch kernels add
    in the same order (73.00 on an AMD EPYC at AVX2, 73.75 on the study's host: docs/results): the
    record names the CPU, torch's dispatch level and torch's version, through result.json and the
    row of results.parquet (the MLflow tag: test_sweep.py's end-to-end test)."""
    import torch
    from conmim.trial import TrialResult, result_row
    res = _result()
    cpu, kernels, version = res.machine.split("; ")[:3]
    assert cpu and kernels == f"cpu kernels {torch.backends.cpu.get_cpu_capability()}"
    assert version == f"torch {torch.__version__}"
    back = TrialResult.read(res.write(tmp_path).parent)
    assert back.machine == res.machine
    record = {"name": "baseline_seed0", "variant": "baseline", "seed": 0, "overrides": {}, "key": res.canonical_hash}
    assert result_row(record, "finished", back)["machine"] == res.machine
    assert result_row(record, "failed")["machine"] == ""
