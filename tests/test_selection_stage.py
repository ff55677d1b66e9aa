"""A fair ablation in two stages: every arm gets the same budget of settings, each arm's setting is
chosen on a validation metric on seeds of its own, never a diverged one while a stable one exists;
then the comparison runs each arm at its choice (conmim/run/selection.py)."""
import json

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
    res = CliRunner().invoke(main, ["sweep", str(sweep_file(tmp_path)), "--dry-run"])
    assert res.exit_code == 0 and "selection stage (fair.selection)" in res.output
    assert "12 trials: 10 distinct, 2 aliases" in res.output and "shared_lr=0.003_seed101" in res.output


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
