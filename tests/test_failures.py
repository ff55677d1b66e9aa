"""Failures as data: what a worker records is read back only for its own attempt."""
from conmim.failures import DivergedError, TrialFailure, read_worker_failure, record_worker_failure


def test_a_recorded_failure_is_read_back_for_its_attempt_only(tmp_path):
    try:
        raise RuntimeError("CUDA out of memory\nmore text")
    except RuntimeError as e:
        record_worker_failure(tmp_path, e, "trial", attempt="a1")
    assert read_worker_failure(tmp_path, "a1") == TrialFailure("error", "RuntimeError", "CUDA out of memory", "trial")
    assert read_worker_failure(tmp_path, "a2") is None  # an earlier fit()'s record is not this one's
    assert read_worker_failure(tmp_path / "nothing", "a1") is None


def test_divergence_is_its_own_kind():
    f = TrialFailure.of(DivergedError("pre-training loss is nan at step 3 (epoch 0)"), "trial")
    assert f.kind == "diverged" and f.reason == "DivergedError: pre-training loss is nan at step 3 (epoch 0)"
