"""Searches select on validation data only; the sweep file's ``report`` section is validated."""
import pytest
import yaml
from click.testing import CliRunner

from conmim.cli import main
from conmim.config.expand import load_sweep
from conmim.metrics import VALIDATION_METRICS
from conftest import REPO

SEARCH = REPO / "sweeps" / "search-temperature-momentum.yaml"


def _sweep(tmp_path, **extra):
    spec = {"name": "s", "base": "tiny", "storage": str(tmp_path / "ray_results"), **extra}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def _optuna(metric):
    return {"search": "optuna", "optuna": {"metric": metric, "space": {
        "objective.temperature": {"type": "loguniform", "low": 0.05, "high": 0.2}}}}


def dry_run(path, *sets):
    return CliRunner().invoke(main, ["sweep", str(path), "--dry-run", *[a for s in sets for a in ("--set", s)]])


@pytest.mark.parametrize("metric", ["finetune_top1", "linear_probe_top1", "knn_top1"])
def test_optuna_on_a_test_split_metric_is_refused(tmp_path, metric):
    res = dry_run(_sweep(tmp_path, **_optuna(metric)))
    assert res.exit_code == 2, res.output
    out = res.output
    assert "optuna.metric" in out and repr(metric) in out and "test split" in out and "Traceback" not in out
    assert all(m in out for m in VALIDATION_METRICS)  # what is allowed, from the one list


def test_optuna_on_an_unknown_metric_is_refused(tmp_path):
    res = dry_run(_sweep(tmp_path, **_optuna("val_accuracy")))
    assert res.exit_code == 2 and "optuna.metric" in res.output and "finetune_val_top1" in res.output, res.output


def test_asha_on_a_test_split_metric_is_refused(tmp_path):
    res = dry_run(_sweep(tmp_path, **_optuna("finetune_val_top1"), scheduler="asha",
                         asha={"metric": "knn_top1", "mode": "max"}))
    assert res.exit_code == 2 and "asha.metric" in res.output and "test split" in res.output, res.output


def test_search_metric_set_on_the_command_line_is_checked_too(tmp_path):
    res = dry_run(SEARCH, "optuna.metric=finetune_top1")
    assert res.exit_code == 2 and "optuna.metric" in res.output, res.output


def test_validation_metrics_are_accepted(tmp_path):
    for m in VALIDATION_METRICS:
        res = dry_run(_sweep(tmp_path, **_optuna(m), scheduler="asha", asha={"metric": m}))
        assert res.exit_code == 0, res.output


def test_shipped_search_selects_on_validation_and_passes_dry_run():
    sw = load_sweep(str(SEARCH))
    assert sw.spec.optuna.metric == "finetune_val_top1" and sw.spec.asha.metric in VALIDATION_METRICS
    res = dry_run(SEARCH)
    assert res.exit_code == 0, res.output


def test_report_section_defaults_and_values(tmp_path):
    sw = load_sweep(str(_sweep(tmp_path, variants=[{"name": "t02", "set": {"objective.temperature": 0.2}}])))
    assert (sw.spec.report.metric, sw.spec.report.baseline) == ("finetune_top1", "baseline")
    sw = load_sweep(str(_sweep(tmp_path, variants=[{"name": "t02", "set": {"objective.temperature": 0.2}}],
                               report={"metric": "knn_top1", "baseline": "t02"})))
    assert (sw.spec.report.metric, sw.spec.report.baseline) == ("knn_top1", "t02")


def test_report_metric_unknown_is_refused_with_the_allowed_ones(tmp_path):
    from conmim.metrics import FINAL_METRICS
    res = dry_run(_sweep(tmp_path, report={"metric": "top1"}))
    assert res.exit_code == 2 and "report.metric" in res.output and "'top1'" in res.output, res.output
    assert all(m in res.output for m in FINAL_METRICS)


def test_report_baseline_must_be_a_variant(tmp_path):
    res = dry_run(_sweep(tmp_path, variants=[{"name": "t02", "set": {"objective.temperature": 0.2}}],
                         report={"baseline": "t2"}))
    assert res.exit_code == 2 and "report.baseline" in res.output and "t02" in res.output, res.output
    res = dry_run(_sweep(tmp_path, report={"metrics": "knn_top1"}))
    assert res.exit_code == 2 and "report.metrics" in res.output and "metric" in res.output, res.output
