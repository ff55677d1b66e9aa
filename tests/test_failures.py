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


def test_an_injected_death_waits_for_the_newest_checkpoint_folder_to_be_registered(tmp_path):
    """debug.crash_at_step / kill_at_step die once Ray Train's controller has registered the last
    checkpoint (its snapshot names it). The snapshot file itself is named checkpoint_manager_...:
    it once sorted last among the checkpoints, so the wait ran to its 120 s deadline every time."""
    from conmim.train.faults import checkpoint_registered
    snapshot = tmp_path / "checkpoint_manager_snapshot.json"
    assert checkpoint_registered(tmp_path, snapshot)  # no checkpoint yet: nothing to wait for
    (tmp_path / "checkpoint_2026-12-06_21-07-06.297751").mkdir()
    assert not checkpoint_registered(tmp_path, snapshot)  # reported, no snapshot yet
    snapshot.write_text('{"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_2026-12-06_21-07-06.297751"}]}')
    assert checkpoint_registered(tmp_path, snapshot)
    (tmp_path / "checkpoint_2026-12-06_21-07-08.315802").mkdir()
    assert not checkpoint_registered(tmp_path, snapshot)  # the newer one not yet registered
