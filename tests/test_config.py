import subprocess

import pytest
from click.testing import CliRunner

from conmim.cli import main
from conmim.config import ConfigError, canonical, canonical_hash, load_config
from conftest import CONMIM


def test_presets_resolve(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    for name in ("tiny", "demo"):
        assert load_config(name).data.name == "fashion-mnist"
    for name in ("vit-s16-imagenet", "vit-b16-imagenet"):
        cfg = load_config(name, [f"data.root={tmp_path}"])
        assert cfg.model.img_size == 224 and cfg.objective.temperature == 0.1
        assert cfg.masking.min_block_patches == 16 and cfg.pretrain.betas == (0.9, 0.98)
    with pytest.raises(ConfigError, match="data.root is required"):
        load_config("vit-b16-imagenet")


def test_overrides_and_masking_shorthand():
    cfg = load_config("tiny", ["objective.temperature=0.2", "masking=false", "pretrain.betas=[0.9, 0.95]"])
    assert cfg.objective.temperature == 0.2 and cfg.masking.enabled is False
    assert cfg.pretrain.betas == (0.9, 0.95)


def test_canonical_merges_equivalent_configs():
    base = load_config("tiny")
    twin = load_config("tiny", ["objective.stop_grad=false"])  # momentum target: no gradient anyway
    assert canonical(twin) == canonical(base) and canonical_hash(twin) == canonical_hash(base)
    shared = load_config("tiny", ["objective.target_encoder=shared"])
    shared_other_m = load_config("tiny", ["objective.target_encoder=shared", "objective.momentum=0.9"])
    assert canonical(shared).objective.momentum is None
    assert canonical_hash(shared) == canonical_hash(shared_other_m)
    # ...but a real change is a different experiment
    shared_nosg = load_config("tiny", ["objective.target_encoder=shared", "objective.stop_grad=false"])
    assert canonical_hash(shared_nosg) != canonical_hash(shared)
    assert canonical_hash(load_config("tiny", ["objective.temperature=0.2"])) != canonical_hash(base)
    # resources do not change the experiment
    assert canonical_hash(load_config("tiny", ["resources.cpus_per_worker=1"])) == canonical_hash(base)
    # from scratch: the pre-training knobs are irrelevant
    s1 = load_config("tiny", ["pretrain.enabled=false"])
    s2 = load_config("tiny", ["pretrain.enabled=false", "objective.temperature=0.5", "masking.ratio=0.7"])
    assert canonical_hash(s1) == canonical_hash(s2)


def test_compile_takes_a_mode_and_keeps_the_ids_of_true_and_false():
    """``pretrain.compile`` took true/false; it now also takes torch.compile's modes. The canonical
    id hashes the config's JSON, so true and false must still be written as JSON booleans: the
    trials of a sweep begun before the change keep their ids, and resume instead of running again."""
    base = load_config("tiny")
    for value, written in (("false", "false"), ("true", "true"), ("reduce-overhead", '"reduce-overhead"'),
                           ("max-autotune-no-cudagraphs", '"max-autotune-no-cudagraphs"')):
        cfg = load_config("tiny", [f"pretrain.compile={value}"])
        assert f'"compile": {written}' in canonical(cfg).model_dump_json().replace('":', '": ')
    assert canonical_hash(load_config("tiny", ["pretrain.compile=false"])) == canonical_hash(base)
    assert len({canonical_hash(load_config("tiny", [f"pretrain.compile={v}"]))
                for v in ("false", "true", "reduce-overhead", "max-autotune")}) == 4
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["pretrain.compile=fast"])
    assert str(e.value).count("pretrain.compile") == 1  # one line for the two ways it failed
    assert "allowed: true, false, 'reduce-overhead', 'max-autotune' or 'max-autotune-no-cudagraphs'" in str(e.value)


BAD = [
    ("unknown top-level key", "foo: 1\n", [], "foo"),
    ("unknown nested key", "objective:\n  temprature: 0.2\n", [], "objective.temprature"),
    ("wrong type", "pretrain:\n  epochs: many\n", [], "pretrain.epochs"),
    ("out of range", "objective:\n  temperature: -1\n", [], "objective.temperature"),
    ("out of range ratio", "masking:\n  ratio: 1.5\n", [], "masking.ratio"),
    ("unknown enum", "objective:\n  perturbation: sideways\n", [], "objective.perturbation"),
    ("missing dataset", "data:\n  root: /nonexistent/fmnist\n", [], "data.root"),
    ("bad override key", "{}\n", ["--set", "objective.tau=0.1"], "objective.tau"),
    ("bad override value", "{}\n", ["--set", "masking.type=hexagon"], "masking.type"),
    ("impossible combination", "resources:\n  num_workers: 3\n", [], "pretrain.batch_size"),
    ("CUDA graphs with accumulation", "pretrain:\n  compile: reduce-overhead\n  accumulate: 2\n", [],
     "pretrain.accumulate=2"),
    ("yaml syntax", "objective: [\n", [], "line"),
    ("not a mapping", "- 1\n- 2\n", [], "mapping"),
]


@pytest.mark.parametrize("name,text,extra,key", BAD, ids=[b[0] for b in BAD])
def test_bad_config_exits_2_naming_the_key(tmp_path, name, text, extra, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    res = CliRunner().invoke(main, ["validate", str(path), *extra])
    assert res.exit_code == 2, res.output
    assert key in res.output and "Traceback" not in res.output
    assert res.output.startswith("conmim: error:")


def test_bad_config_exit_code_from_a_real_process(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("objective:\n  dictionary: galaxy\n")
    p = subprocess.run([CONMIM, "train", str(path), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 2
    assert "objective.dictionary" in p.stderr and "'image' or 'batch'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()  # nothing started or half-written


def test_validate_prints_resolved_config():
    res = CliRunner().invoke(main, ["validate", "tiny", "--set", "objective.temperature=0.3"])
    assert res.exit_code == 0
    assert "temperature: 0.3" in res.output and "canonical experiment id" in res.output


@pytest.mark.parametrize("sets, key, allowed", [
    (["model.shared_rel_pos_bias=true"], "model.shared_rel_pos_bias", "beit_*"),
    (["model.name=resnet18", "model.layer_scale_init=0.1"], "model.layer_scale_init", "vit_*"),
])
def test_a_knob_the_model_cannot_honour_is_refused(sets, key, allowed):
    """A vit_* has an absolute position embedding whatever shared_rel_pos_bias says: refused, not ignored."""
    with pytest.raises(ConfigError) as e:
        load_config("tiny", sets)
    assert key in str(e.value) and allowed in str(e.value) and "ignored" in str(e.value)
    beit = load_config("tiny", ["model.name=beit_base_patch16_224", "model.shared_rel_pos_bias=true",
                                "model.layer_scale_init=0.1"])
    assert beit.model.shared_rel_pos_bias and beit.model.layer_scale_init == 0.1
    assert load_config("tiny", ["model.layer_scale_init=0.1"]).model.layer_scale_init == 0.1  # vit_*: LayerScale
