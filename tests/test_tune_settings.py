"""What a sweep file asks of Ray Tune, at unit level: the retries of ``max_failures`` and the
ASHA scheduler of ``scheduler: asha``. (Neither is run end to end by the suite: a retry and an
early stop are Tune's own; README says so.)"""
from conftest import REPO
from conmim.config.expand import load_sweep
from conmim.run.tune import _run_config, _scheduler


def test_a_sweeps_max_failures_reaches_tunes_failure_config(tmp_path):
    """The sweep key ``max_failures`` is Tune's FailureConfig: a trial whose function raises (an
    error outside its Ray Train run) or whose process dies is retried that many times. (Not run
    end to end: the retry itself is Tune's.)"""
    p = tmp_path / "s.yaml"
    for extra, want in (("", 0), ("max_failures: 3\n", 3)):
        p.write_text(f"name: s\nbase: tiny\n{extra}variants:\n  - {{name: t02, set: {{objective.temperature: 0.2}}}}\n")
        rc = _run_config(load_sweep(str(p)), tmp_path / "tune", [])
        assert rc.failure_config.max_failures == want
        assert rc.storage_path == str(tmp_path / "tune") and rc.name == "sweep"
    # a trial's own worker restarts are the experiment's resources.max_failures, not Tune's
    p.write_text("name: s\nbase: tiny\nmax_failures: 3\nresources: {max_failures: 1}\n")
    sw = load_sweep(str(p))
    assert _run_config(sw, tmp_path / "tune", []).failure_config.max_failures == 3
    assert {t.config.resources.max_failures for t in sw.distinct} == {1}


def test_scheduler_asha_is_tunes_asha_with_the_files_settings(tmp_path):
    """The shipped Optuna + ASHA search: ASHA reads the per-epoch k-NN proxy (a validation
    metric) every report, with rungs at 1, 2 and 4 reports (grace 1, factor 2, max_t the trial's
    epochs + 1); a grid sweep has no scheduler."""
    from ray.tune.schedulers import ASHAScheduler
    sw = load_sweep(str(REPO / "sweeps" / "search-temperature-momentum.yaml"))
    s = _scheduler(sw)
    assert isinstance(s, ASHAScheduler)
    assert (s._metric, s._mode, s._reduction_factor, s._time_attr) == ("knn_proxy_top1", "max", 2, "training_iteration")
    cfg = sw.distinct[0].config
    assert s._max_t == cfg.pretrain.epochs + cfg.finetune.epochs + 1 and cfg.eval.proxy_every == 1
    assert sorted(r[0] for r in s._brackets[0]._rungs) == [1, 2, 4]
    p = tmp_path / "s.yaml"
    p.write_text("name: s\nbase: tiny\nvariants:\n  - {name: t02, set: {objective.temperature: 0.2}}\n")
    assert _scheduler(load_sweep(str(p))) is None


def test_a_train_run_without_ray_datasets_gets_every_callback_of_rays_but_the_dataset_manager(small, tmp_path):
    """Ray Train 2.60 starts a ``DatasetManager`` actor (a process importing Ray Data) for every
    run, Ray Datasets or not; conmim passes none, so its trainer leaves that callback out and
    keeps every other one of Ray's (checked here against Ray's own list, which a Ray upgrade may
    change). A trainer given a Ray Dataset keeps it. The run itself: tests/test_distributed.py."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from conmim.run.ray_train import _trainer, _without_dataset_manager
    ours = _trainer(small(), tmp_path, "trial", None)
    assert type(ours).__name__ == "TorchTrainer" and isinstance(ours, TorchTrainer)
    rays = TorchTrainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1),
                        run_config=ray.train.RunConfig(storage_path=str(tmp_path)))
    names = [type(c).__name__ for c in rays._create_default_callbacks()]
    assert "DatasetsCallback" in names, names
    assert [type(c).__name__ for c in ours._create_default_callbacks()] == [n for n in names if n != "DatasetsCallback"]
    with_data = _without_dataset_manager(TorchTrainer)(
        lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1), datasets={"train": lambda: None},
        run_config=ray.train.RunConfig(storage_path=str(tmp_path)))
    assert [type(c).__name__ for c in with_data._create_default_callbacks()] == names
