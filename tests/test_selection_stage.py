"""A fair ablation in two stages: every arm gets the same budget of settings, each arm's setting is
chosen on a validation metric on seeds of its own, never a diverged one while a stable one exists;
then the comparison runs each arm at its choice (conmim/run/selection.py)."""
import json
import math

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from conmim.cli import main
from conmim.config import ConfigError
from conmim.config.expand import load_sweep, selection_stage
from conmim.run.selection import choose
from conmim.trial import TrialResult
from conftest import SMALL

NAN = float("nan")


def sweep_file(tmp_path, name="fair", selection=None, variants=None, seeds=(0,), **extra):
    spec = {"name": name, "base": {"config": "tiny", "set": dict(SMALL)}, "seeds": list(seeds),
            "variants": variants if variants is not None else [
                {"name": "shared", "set": {"objective.target_encoder": "shared"}},
                {"name": "scratch", "set": {"pretrain.enabled": False}}],
            "selection": selection or {"budget": {"pretrain.lr": [1.0e-3, 3.0e-3]}, "seeds": [100, 101]},
            "storage": str(tmp_path / "ray_results"), "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            **extra}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_the_selection_stage_is_every_arm_at_every_setting_on_its_own_seeds(tmp_path):
    sw = load_sweep(str(sweep_file(tmp_path)))
    stage = selection_stage(sw)
    assert stage.spec.name == "fair.selection" and stage.spec.experiment == "fair.selection" and stage.stage == "selection"
    assert {t.seed for t in stage.trials} == {100, 101} and {t.seed for t in sw.trials} == {0}
    assert {(t.arm, t.setting["pretrain.lr"]) for t in stage.trials} == {
        (a, lr) for a in ("baseline", "shared", "scratch") for lr in (1e-3, 3e-3)}
    # scratch has no pre-training: its lr cannot matter, so its second setting is the same experiment
    assert {t.name for t in stage.aliases} == {"scratch_lr=0.003_seed100", "scratch_lr=0.003_seed101"}
    # selection reads validation only: its trials never evaluate on the test split; the comparison's do
    assert all(not t.config.eval.test_split for t in stage.trials) and all(t.config.eval.test_split for t in sw.trials)
    res = CliRunner().invoke(main, ["sweep", str(sweep_file(tmp_path)), "--dry-run"])
    assert res.exit_code == 0 and "selection stage (fair.selection)" in res.output
    assert "12 trials: 10 distinct, 2 aliases" in res.output and "shared_lr=0.003_seed101" in res.output


@pytest.mark.slow
def test_a_trial_without_the_test_split_never_reads_it(tmp_path, monkeypatch):
    """eval.test_split=false (every selection-stage trial): pre-training, the shortcut diagnostics and
    the fine-tune's validation top-1 run; nothing reads the test split (no probes, no test top-1)."""
    import conmim.data.sources as sources
    from conmim.config import load_config
    from conmim.trial import run_in_process
    read, load = [], sources.load_splits

    class Watched(dict):
        def __getitem__(self, key):
            read.append(key)
            return super().__getitem__(key)

    monkeypatch.setattr(sources, "load_splits", lambda *a, **k: Watched(load(*a, **k)))
    monkeypatch.setattr("conmim.train.finetune.load_splits", sources.load_splits)
    sets = [f"{k}={v}" for k, v in SMALL.items()] + ["eval.probe_online=true"]
    result = run_in_process(load_config("tiny", sets + ["eval.test_split=false"]), tmp_path / "val-only")
    assert "test" not in read and {"train", "val"} <= set(read), read
    m = result.metrics
    assert math.isnan(m["finetune_top1"]) and math.isnan(m["knn_top1"]) and math.isnan(m["linear_probe_top1"])
    assert 0.1 <= m["finetune_val_top1"] <= 1 and math.isfinite(m["final_pretrain_loss"])
    assert math.isfinite(m["all_masked_loss"])  # the shortcut diagnostics read validation images
    read.clear()  # the same trial with the test split reads it (the watch sees reads)
    result = run_in_process(load_config("tiny", sets), tmp_path / "with-test")
    assert "test" in read and math.isfinite(result.metrics["finetune_top1"]) and math.isfinite(result.metrics["knn_top1"])


@pytest.mark.parametrize("selection, variants, seeds, named", [
    ({"budget": {"pretrain.lr": [1e-3]}, "seeds": [0, 5]}, None, (0,), "selection.seeds and seeds share [0]"),
    ({"budget": {"pretrain.lr": [1e-3]}, "seeds": [5]}, [{"name": "v", "set": {"pretrain.lr": 0.1}}], (0,),
     "pretrain.lr is in selection.budget and also set"),
    ({"budget": {}, "seeds": [5]}, None, (0,), "selection.budget is empty"),
    ({"budget": {"pretrain.lr": []}, "seeds": [5]}, None, (0,), "selection.budget.pretrain.lr must be a non-empty"),
    ({"budget": {"pretrain.nope": [1]}, "seeds": [5]}, None, (0,), "pretrain.nope"),
    ({"budget": {"pretrain.lr": [1e-3]}, "seeds": [5], "metric": "finetune_top1"}, None, (0,), "test split"),
])
def test_a_bad_selection_section_exits_2_naming_the_key(tmp_path, selection, variants, seeds, named):
    res = CliRunner().invoke(main, ["sweep", str(sweep_file(tmp_path, selection=selection, variants=variants,
                                                            seeds=seeds)), "--dry-run"])
    assert res.exit_code == 2 and named in res.output, res.output
    assert not (tmp_path / "ray_results").exists()


def fake_results(stage, values, diverged=()):
    """result.json of each distinct selection trial, as a finished trial writes it."""
    for t in stage.distinct:
        v = values[(t.arm, t.setting["pretrain.lr"])]
        if v is None:
            continue
        v = v[t.seed] if isinstance(v, dict) else v
        TrialResult({"finetune_val_top1": v}, {}, {"diverged": (t.arm, t.setting["pretrain.lr"]) in diverged},
                    t.key, t.config.to_dict()).write(stage.dir / "trials" / t.name)


def test_each_arm_gets_its_best_stable_setting(tmp_path):
    stage = selection_stage(load_sweep(str(sweep_file(tmp_path))))
    fake_results(stage, {("baseline", 1e-3): 0.70, ("baseline", 3e-3): {100: 0.74, 101: 0.70},
                         ("shared", 1e-3): 0.60, ("shared", 3e-3): 0.90,   # best, but diverged
                         ("scratch", 1e-3): 0.50}, diverged={("shared", 3e-3)})
    c = choose(stage, "finetune_val_top1", "max")
    assert c["chosen"] == {"baseline": {"pretrain.lr": 3e-3}, "shared": {"pretrain.lr": 1e-3},
                           "scratch": {"pretrain.lr": 1e-3}}
    assert c["all_diverged"] == []
    row = next(r for r in c["table"] if r["arm"] == "baseline" and r["chosen"])
    assert row["mean"] == pytest.approx(0.72) and row["values"] == {100: 0.74, 101: 0.70}
    scratch2 = next(r for r in c["table"] if r["arm"] == "scratch" and r["setting"]["pretrain.lr"] == 3e-3)
    assert scratch2["same_as"] == ["scratch_lr=0.001"] and scratch2["mean"] == pytest.approx(0.50)
    assert choose(stage, "finetune_val_top1", "min")["chosen"]["baseline"] == {"pretrain.lr": 1e-3}


def test_an_arm_whose_every_setting_diverged_is_said_and_a_missing_one_refused(tmp_path):
    stage = selection_stage(load_sweep(str(sweep_file(tmp_path))))
    vals = {("baseline", 1e-3): 0.7, ("baseline", 3e-3): 0.6, ("shared", 1e-3): 0.3, ("shared", 3e-3): 0.4,
            ("scratch", 1e-3): 0.5}
    fake_results(stage, vals, diverged={("shared", 1e-3), ("shared", 3e-3)})
    c = choose(stage, "finetune_val_top1", "max")
    assert c["all_diverged"] == ["shared"] and c["chosen"]["shared"] == {"pretrain.lr": 3e-3}
    (tmp_path / "b").mkdir()
    other = selection_stage(load_sweep(str(sweep_file(tmp_path / "b"))))
    fake_results(other, {**vals, ("shared", 1e-3): None, ("shared", 3e-3): None})
    with pytest.raises(ConfigError, match="no setting of arm 'shared' finished"):
        choose(other, "finetune_val_top1", "max")


def _runs(uri, experiment):
    from mlflow.tracking import MlflowClient
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], max_results=1000) if exp else []


def _trial_files(*sweep_dirs):
    """Every file of every trial folder, with its modification time and size."""
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size)
            for d in sweep_dirs for p in sorted((d / "trials").rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.timeout(900)  # two stages and a resume: 143-195 s in make test, 310 s once when the VM ran at half speed
def test_two_stage_sweep_end_to_end_chooses_the_stable_setting_and_resumes_without_rerunning(ray_session, tmp_path):
    """The real CLI, real Ray Tune/Train, real MLflow sqlite, real Fashion-MNIST: the selection
    stage tries the baseline at lr 1e-3 (stable at temperature 1.0: loss below ln 16) and at lr 1.0
    (diverges); the baseline is compared at 1e-3 whatever the diverged setting's validation score,
    the report shows the choice and the selection table, and --resume of the finished sweep reruns
    nothing. Measured (seeds 100, 101, 7): final loss 2.71-2.73 at lr 1e-3, 2.81-2.84 at lr 1.0,
    ln 16 = 2.77; the diverged setting's validation top-1 was the higher one in one run (29.7 vs
    28.9 %), so the choice is the divergence rule's, not the metric's. About 2.2 min on 2 cores."""
    path = sweep_file(tmp_path, name="fair2", seeds=(0,),
                      variants=[{"name": "scratch", "set": {"pretrain.enabled": False}}],
                      selection={"budget": {"pretrain.lr": [1.0e-3, 1.0]}, "seeds": [100]},
                      resources={"max_concurrent_trials": 2})
    spec = yaml.safe_load(path.read_text())
    spec["base"]["set"]["objective.temperature"] = 1.0
    path.write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sel_dir, cmp_dir = tmp_path / "ray_results" / "fair2.selection", tmp_path / "ray_results" / "fair2"

    res = CliRunner().invoke(main, ["sweep", str(path)])
    assert res.exit_code == 0, res.output[-4000:]
    assert "selection: baseline -> pretrain.lr=0.001" in res.output, res.output[-4000:]

    # the selection stage: its own folder, MLflow experiment, every run tagged conmim.stage=selection
    sel_runs = _runs(uri, "fair2.selection")
    sel_trials = {r.info.run_name: r for r in sel_runs if r.data.tags.get("conmim.role") == "trial"}
    # scratch does not pre-train, so its lr=1.0 setting is the same experiment as its lr=0.001 one
    assert sorted(sel_trials) == ["baseline_lr=0.001_seed100", "baseline_lr=1.0_seed100", "scratch_lr=0.001_seed100"]
    assert all(r.data.tags.get("conmim.stage") == "selection" for r in sel_runs), [r.data.tags for r in sel_runs]
    assert all(r.info.status == "FINISHED" for r in sel_runs), [(r.info.run_name, r.info.status) for r in sel_runs]
    bad, good = sel_trials["baseline_lr=1.0_seed100"], sel_trials["baseline_lr=0.001_seed100"]
    assert bad.data.params["pretrain.lr"] == "1.0" and bad.data.metrics["diverged"] == 1.0
    assert "diverged" in bad.data.tags["conmim.warning"]
    assert good.data.metrics["diverged"] == 0.0 and good.data.metrics["final_pretrain_loss"] < math.log(16)
    assert (sel_dir / "trials" / "baseline_lr=1.0_seed100" / "result.json").exists()
    # selection read the validation split only: no test top-1, no probes
    assert all(math.isnan(r.data.metrics.get(k, NAN)) for r in sel_trials.values() for k in ("finetune_top1", "knn_top1"))

    # the choice: never the diverged setting; kept in selection.json
    choice = json.loads((cmp_dir / "selection.json").read_text())
    assert choice["chosen"] == {"baseline": {"pretrain.lr": 1e-3}, "scratch": {"pretrain.lr": 1e-3}}
    assert choice["all_diverged"] == [] and choice["metric"] == "finetune_val_top1"
    rows = {(r["arm"], r["setting"]["pretrain.lr"]): r for r in choice["table"]}
    assert rows[("baseline", 1.0)]["diverged"] == 1 and not rows[("baseline", 1.0)]["chosen"]
    assert rows[("baseline", 1e-3)]["chosen"] and rows[("baseline", 1e-3)]["values"]["100"] == pytest.approx(
        good.data.metrics["finetune_val_top1"])

    # the comparison: its own experiment, the comparison's seed, each arm at its choice, no selection tag
    cmp_runs = _runs(uri, "fair2")
    cmp_trials = {r.info.run_name: r for r in cmp_runs if r.data.tags.get("conmim.role") == "trial"}
    assert sorted(cmp_trials) == ["baseline_seed0", "scratch_seed0"]
    assert all(r.data.tags.get("conmim.stage") in (None, "comparison") for r in cmp_runs)
    assert all(r.info.status == "FINISHED" for r in cmp_runs), [(r.info.run_name, r.info.status) for r in cmp_runs]
    base = cmp_trials["baseline_seed0"]
    assert base.data.params["pretrain.lr"] == "0.001" and base.data.params["seed"] == "0"
    cfg = json.loads((cmp_dir / "trials" / "baseline_seed0" / "result.json").read_text())["config"]
    assert cfg["pretrain"]["lr"] == pytest.approx(1e-3) and cfg["objective"]["temperature"] == 1.0
    assert {r["trial"] for r in pq.read_table(cmp_dir / "results.parquet").to_pylist()} == set(cmp_trials)

    # the report: each arm's choice and the selection table
    rep = CliRunner().invoke(main, ["report", str(cmp_dir)])
    assert rep.exit_code == 0, rep.output
    assert "## Selection: each arm at its own best setting" in rep.output
    line = next(l for l in rep.output.splitlines() if l.startswith("| baseline | pretrain.lr=1.0 |"))
    assert line.rstrip().endswith("| 1 | 0 |  |")  # diverged once, not chosen
    line = next(l for l in rep.output.splitlines() if l.startswith("| baseline | pretrain.lr=0.001 |"))
    assert "**chosen**" in line
    assert "same experiment as scratch_lr=0.001" in rep.output

    # --resume of the finished two-stage sweep: nothing runs again, no MLflow run is added
    before_runs = {r.info.run_id for r in _runs(uri, "fair2.selection") + _runs(uri, "fair2")}
    before_files = _trial_files(sel_dir, cmp_dir)
    res = CliRunner().invoke(main, ["sweep", str(path), "--resume"])
    assert res.exit_code == 0, res.output[-4000:]
    assert "selection: baseline -> pretrain.lr=0.001" in res.output
    after = _runs(uri, "fair2.selection") + _runs(uri, "fair2")
    assert {r.info.run_id for r in after} == before_runs
    assert all(r.info.status == "FINISHED" for r in after), [(r.info.run_name, r.info.status) for r in after]
    assert _trial_files(sel_dir, cmp_dir) == before_files
    assert json.loads((cmp_dir / "selection.json").read_text())["chosen"] == choice["chosen"]
