"""The data pre-flight (conmim/data/preflight.py): a config that is valid on its own but cannot work
on the data it points at exits 2 before anything trains, one paragraph naming the key, the value
and what the data allows; a sweep refuses it before its first trial. Each case drives the real
`conmim` CLI on a small real data set the test writes (PNG ImageFolders, Parquet, Fashion-MNIST)."""
import io
import json
import os
import socket
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from conmim.config import load_config
from conmim.data.facts import read_facts
from conmim.data.sources import load_splits
from conftest import CONMIM, SMALL

# A tiny-preset run that fits a small ImageFolder: every test below breaks one thing of it.
FITS = ["data.name=imagefolder", "data.subset=null", "data.eval_subset=null", "data.val_size=4",
        "pretrain.epochs=1", "pretrain.batch_size=8", "pretrain.warmup_epochs=0", "finetune.epochs=1",
        "finetune.batch_size=8", "finetune.warmup_epochs=0", "eval.probe_epochs=1", "eval.knn_k=5",
        "resources.cpus_per_worker=1"]


def imagefolder(root, train: dict, val: dict | None = None, size=(28, 28), seed=0):
    """root/train/<class>/<i>.png and root/val/<class>/<i>.png, grey noise images."""
    rng = np.random.default_rng(seed)
    for split, classes in (("train", train), ("val", val if val is not None else {c: 2 for c in train})):
        for c, n in classes.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def sets(root, *extra):
    return [a for s in [*FITS, f"data.root={root}", *extra] for a in ("--set", s)]


def conmim(tmp_path, *args, env=None):
    return subprocess.run([CONMIM, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=env)


def assert_refused(p, *must):
    """Exit 2, one paragraph on stderr naming what is wrong, no traceback."""
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert p.stderr.startswith("conmim: error:") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert "Nothing was started" in p.stderr
    for m in must:
        assert m in p.stderr, (m, p.stderr)


def train_refused(tmp_path, args, *must, backend="process"):
    """`conmim train` is refused, and writes nothing: no output folder."""
    p = conmim(tmp_path, "train", *args, "--backend", backend, "--out", tmp_path / "out")
    assert_refused(p, *must)
    assert not (tmp_path / "out").exists()
    return p


@pytest.fixture
def folder(tmp_path):
    """Two classes of 14 training images, 2 validation images each: FITS works on it."""
    return imagefolder(tmp_path / "data", {"a": 14, "b": 14})


# ---------------------------------------------------------------------------------------------
# What the pre-flight reads is what the loaders load
# ---------------------------------------------------------------------------------------------
def test_the_preflight_sees_the_loaders_splits(tmp_path, folder):
    """Labels per split (after data.val_size, data.subset, data.eval_subset) as load_splits makes
    them, for each source; the data are not decoded for it."""
    pq_path = tmp_path / "fm.parquet"
    assert conmim(tmp_path, "data", "prepare", "fashion-mnist", pq_path, "--limit", "60").returncode == 0
    for over in (["data.subset=300", "data.eval_subset=200", "data.val_size=500"],
                 [f"data.name=imagefolder", f"data.root={folder}", "data.val_size=3", "data.subset=20"],
                 [f"data.name=parquet", f"data.root={pq_path}", "data.val_size=7", "data.eval_subset=30"]):
        cfg = load_config("tiny", over)
        facts, splits = read_facts(cfg.data), load_splits(cfg.data)
        for s in ("train", "val", "test"):
            assert np.array_equal(facts.labels[s], splits[s].labels), (over, s)
        assert facts.num_classes == splits["train"].num_classes


def test_data_that_fits_passes_and_validate_describes_it(tmp_path, folder):
    p = conmim(tmp_path, "validate", "tiny", *sets(folder))
    assert p.returncode == 0, p.stderr
    assert "# data: train 24, val 4, test 4 images; 2 classes in train; images 28x28 L" in p.stdout
    assert p.stderr == ""  # nothing suspicious


# ---------------------------------------------------------------------------------------------
# A batch larger than a split: pre-training, fine-tuning, the probes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["process", "ray"])
def test_issue_example_pretrain_batch_larger_than_the_training_split(tmp_path, backend):
    """`conmim train tiny --set data.subset=40 --set data.val_size=8` ended in a traceback after the
    job had started (exit 1); now exit 2 before anything starts, Ray included."""
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "raytmp")}
    env.pop("RAY_ADDRESS", None)
    p = conmim(tmp_path, "train", "tiny", "--backend", backend, "--set", "data.subset=40", "--set", "data.val_size=8",
               "--out", tmp_path / "out", env=env)
    assert_refused(p, "preset 'tiny'", "pretrain.batch_size=64 is larger than the 40 training images (data.subset=40)",
                   "allowed: at most 40")
    assert sorted(x.name for x in tmp_path.iterdir()) == []  # no out folder, no Ray session


def test_finetune_batch_larger_than_the_labelled_images_names_the_per_worker_split(tmp_path, folder):
    args = sets(folder, "finetune.labels_per_class=6", "finetune.batch_size=16", "finetune.accumulate=2",
                "resources.num_workers=2", "pretrain.batch_size=8", "pretrain.accumulate=2")
    train_refused(tmp_path, ["tiny", *args], "finetune.batch_size=16 is larger than the 12 labelled images "
                  "(finetune.labels_per_class=6 x 2 classes)", "resources.num_workers=2",
                  "finetune.accumulate=2 micro-batches of 4", "allowed: at most 12 (a multiple of 4)")


def test_finetune_command_checks_the_finetuning_batch(tmp_path, folder):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "state.pt").write_bytes(b"")  # never read: the pre-flight refuses first
    p = conmim(tmp_path, "finetune", "tiny", "--checkpoint", ckpt, *sets(folder, "finetune.batch_size=32"),
               "--backend", "process", "--out", tmp_path / "out")
    assert_refused(p, "finetune.batch_size=32 is larger than the 24 training images", "allowed: at most 24")
    assert not (tmp_path / "out").exists()


def test_pretrain_command_checks_the_pretraining_batch(tmp_path, folder):
    p = conmim(tmp_path, "pretrain", "tiny", *sets(folder, "pretrain.batch_size=32"), "--backend", "process",
               "--out", tmp_path / "out")
    assert_refused(p, "pretrain.batch_size=32 is larger than the 24 training images")
    assert not (tmp_path / "out").exists()


def test_knn_probe_with_more_neighbours_than_training_images(tmp_path, folder):
    train_refused(tmp_path, ["tiny", *sets(folder, "eval.knn_k=30")],
                  "eval.knn_k=30 is more neighbours than the 24 training images", "allowed: at most 24")


# ---------------------------------------------------------------------------------------------
# Classes
# ---------------------------------------------------------------------------------------------
def test_one_class_imagefolder_is_refused(tmp_path):
    """It used to pre-train, fine-tune and report a meaningless top-1 with exit 0."""
    root = imagefolder(tmp_path / "data", {"only": 20})
    for cmd in (["validate", "tiny", *sets(root)], ["train", "tiny", *sets(root), "--out", tmp_path / "out"]):
        assert_refused(conmim(tmp_path, *cmd), "the training split has 1 class ('only' (label 0))",
                       "at least 2", f"data.root={root}")
    assert not (tmp_path / "out").exists()


def test_labels_per_class_above_the_smallest_class(tmp_path):
    root = imagefolder(tmp_path / "data", {"a": 20, "b": 8}, {"a": 2, "b": 2})
    # (the validation hold-out takes 4 of the 28; which classes they come from is the fixed shuffle's)
    smallest = min(np.bincount(read_facts(load_config("tiny", sets(root)[1::2]).data).labels["train"]))
    train_refused(tmp_path, ["tiny", *sets(root, "finetune.labels_per_class=10")],
                  "finetune.labels_per_class=10 is more than the smallest training class has: 'b' (label 1) has "
                  f"{smallest} images", f"allowed: at most {smallest}")


def test_class_in_val_absent_from_train(tmp_path):
    root = imagefolder(tmp_path / "data", {"a": 14, "b": 14}, {"a": 2, "b": 2, "zebra": 2})
    train_refused(tmp_path, ["tiny", *sets(root)], "has class folders that", "lacks (zebra)",
                  "Every class of val/ needs a folder in train/")


def test_class_left_out_of_training_by_the_subset(tmp_path):
    """Fashion-MNIST, 8 training images: at most 8 of the 10 classes; the held-out ones are in val."""
    train_refused(tmp_path, ["tiny", "--set", "data.subset=8", "--set", "pretrain.batch_size=8", "--set",
                             "finetune.batch_size=8", "--set", "eval.knn_k=4"],
                  "data.subset=8: the val split has classes the training split lacks", "raise data.subset")


def test_parquet_test_label_absent_from_train(tmp_path):
    """A Parquet set whose test rows hold a label no training row has."""
    path = tmp_path / "d.parquet"
    png = _png((28, 28))
    labels = [0, 1] * 10 + [0, 1, 2]
    pq.write_table(pa.table({"image": [png] * len(labels), "label": labels, "split": ["train"] * 20 + ["test"] * 3}),
                   path)
    train_refused(tmp_path, ["tiny", *sets(path, "data.name=parquet")],
                  f"data.root={path}: the test split has classes the training split lacks (label 2)")


# ---------------------------------------------------------------------------------------------
# Splits: data.val_size, empty splits
# ---------------------------------------------------------------------------------------------
def test_val_size_not_below_the_training_images(tmp_path, folder):
    train_refused(tmp_path, ["tiny", *sets(folder, "data.val_size=28")],
                  "data.val_size=28 is not below the 28 images of the training source",
                  "allowed: at most 5")


def test_empty_validation_split(tmp_path, folder):
    train_refused(tmp_path, ["tiny", *sets(folder, "data.val_size=0")],
                  "the val split is empty (data.val_size=0 holds none out)", "at least 1")


def test_flat_val_folder_is_an_empty_test_split(tmp_path):
    """ImageNet's val/ as downloaded (images not in class folders): the loader finds none of them."""
    root = imagefolder(tmp_path / "data", {"a": 14, "b": 14}, {})
    (root / "val").mkdir()
    for i in range(3):
        Image.new("L", (28, 28)).save(root / "val" / f"ILSVRC2012_val_{i}.png")
    train_refused(tmp_path, ["tiny", *sets(root)], "holds 3 images directly", "val-layout")


def test_empty_training_split(tmp_path):
    root = imagefolder(tmp_path / "data", {"a": 0, "b": 0})
    train_refused(tmp_path, ["tiny", *sets(root)], "the training split is empty")


# ---------------------------------------------------------------------------------------------
# Images that cannot be cropped or decoded as configured
# ---------------------------------------------------------------------------------------------
def _png(size, mode="L"):
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_small_images_of_two_sizes_are_refused(tmp_path):
    """Small Parquet images are decoded into one array: they must share one size."""
    path = tmp_path / "d.parquet"
    images = [_png((28, 28))] * 20 + [_png((20, 24))] * 20
    pq.write_table(pa.table({"image": images, "label": [0, 1] * 20, "split": ["train"] * 40}), path)
    train_refused(tmp_path, ["tiny", *sets(path, "data.name=parquet")], f"data.root: small images",
                  "must share one size", "28x28", "20x24")


def test_undecodable_image_is_refused(tmp_path):
    root = imagefolder(tmp_path / "data", {"a": 14, "b": 14})
    (root / "train" / "a" / "0.png").write_bytes(b"not a png")
    train_refused(tmp_path, ["tiny", *sets(root)], f"{root / 'train' / 'a' / '0.png'} is not an image the loaders "
                  "can decode")


# ---------------------------------------------------------------------------------------------
# Suspicious, not impossible: a warning, printed and kept in result.json
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # (a whole tiny trial in a subprocess: ~30 s)
def test_suspicious_data_warns_and_the_warning_is_kept_in_result_json(tmp_path):
    """Few images of a class and a 10:1 split: a warning on stderr; the run goes ahead and its
    result.json holds the warnings."""
    root = imagefolder(tmp_path / "data", {"many": 60, "few": 5}, {"many": 2, "few": 2})
    p = conmim(tmp_path, "validate", "tiny", *sets(root, "data.val_size=2"))
    assert p.returncode == 0, p.stderr
    lines = p.stderr.strip().splitlines()
    assert any(l.startswith("conmim: warning: few images:") and "'few' (label 0)" in l for l in lines), lines
    assert any(l.startswith("conmim: warning: unbalanced: the train split") for l in lines), lines
    p = conmim(tmp_path, "train", "tiny", *sets(root, "data.val_size=2", "finetune.batch_size=4"), "--backend",
               "process", "--out", tmp_path / "out")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "conmim: warning: few images:" in p.stderr
    warnings = json.loads((tmp_path / "out" / "result.json").read_text())["warnings"]
    assert any(w.startswith("few images:") for w in warnings) and any(w.startswith("unbalanced:") for w in warnings)


# ---------------------------------------------------------------------------------------------
# Sweeps: refused before the first trial, locally and before a cluster submission is sent
# ---------------------------------------------------------------------------------------------
def sweep_file(tmp_path, variants, storage=None, uri=None):
    spec = {"name": "pf", "base": {"config": "tiny", "set": dict(SMALL)}, "seeds": [0], "variants": variants,
            "storage": storage or str(tmp_path / "ray_results"),
            "mlflow": {"tracking_uri": uri or f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    p = tmp_path / "pf.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_sweep_wrong_for_its_data_exits_2_before_its_first_trial(tmp_path):
    """One arm's batch exceeds its training split: the whole sweep is refused before Ray, the sweep
    folder or any trial; the MLflow store (which already holds a run) gets no run, none RUNNING."""
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    earlier = c.create_run(c.create_experiment("earlier")).info.run_id
    c.set_terminated(earlier)
    path = sweep_file(tmp_path, [{"name": "big_batch", "set": {"pretrain.batch_size": 512}}])
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "raytmp")}
    env.pop("RAY_ADDRESS", None)
    p = conmim(tmp_path, "sweep", path, env=env)
    assert_refused(p, str(path), "pretrain.batch_size=512 is larger than the 256 training images (data.subset=256)",
                   "(trial big_batch_seed0)")
    assert "baseline_seed0" not in p.stderr  # the arm that fits is not named
    assert sorted(x.name for x in tmp_path.iterdir()) == ["mlflow.db", "pf.yaml"]  # no ray_results, no raytmp
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert [r.info.run_id for r in runs] == [earlier]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    p = conmim(tmp_path, "sweep", path, "--dry-run")  # the dry run says so too
    assert_refused(p, "(trial big_batch_seed0)")


def test_cluster_submission_refused_before_anything_is_sent(tmp_path):
    """--address: the data here is checked before the client is made; nothing listens at the
    address, so a check after it would end in 'cannot use the Ray Jobs API' instead."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = sweep_file(tmp_path, [], storage=str(tmp_path / "shared"), uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    p = conmim(tmp_path, "sweep", path, "--set", "base.set.data.subset=40", "--address", f"http://127.0.0.1:{port}")
    assert_refused(p, "pretrain.batch_size=64 is larger than the 40 training images", "(trial baseline_seed0)")
    assert "Ray Jobs API" not in p.stderr and "submitted" not in p.stdout
    assert sorted(x.name for x in tmp_path.iterdir()) == ["pf.yaml"]


def test_mixup_needs_an_even_per_worker_micro_batch(tmp_path):
    """timm's Mixup pairs a micro-batch's images and asserts an even count mid-run; the split of
    finetune.batch_size over workers x accumulate is checked with the config instead."""
    p = conmim(tmp_path, "validate", "tiny", "--set", "finetune.mixup=0.8", "--set", "finetune.batch_size=12",
               "--set", "finetune.accumulate=2", "--set", "resources.num_workers=2", "--set", "pretrain.batch_size=64")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "finetune.batch_size=12 / (resources.num_workers=2 x finetune.accumulate=2) = 3" in p.stderr, p.stderr
    assert conmim(tmp_path, "validate", "tiny", "--set", "finetune.mixup=0.8", "--set", "finetune.batch_size=16",
                  "--set", "finetune.accumulate=2", "--set", "resources.num_workers=2").returncode == 0


def test_sweep_tags_the_data_warnings_on_the_trials_mlflow_run(ray_session, tmp_path):
    """A real one-trial sweep on unbalanced data: the warnings are printed once, tagged on the
    trial's MLflow run (conmim.warning) and kept in its result.json."""
    from mlflow.tracking import MlflowClient
    from conmim.config.expand import load_sweep
    from conmim.run.tune import run_sweep
    root = imagefolder(tmp_path / "data", {"many": 60, "few": 5}, {"many": 2, "few": 2})
    base = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in FITS)} | {"data.root": str(root), "data.val_size": 2,
                                                                 "finetune.batch_size": 4, "eval.probe_online": False}
    spec = {"name": "warn", "base": {"config": "tiny", "set": base}, "seeds": [0],
            "storage": str(tmp_path / "ray_results"), "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    path = tmp_path / "warn.yaml"
    path.write_text(yaml.safe_dump(spec))
    console: list[str] = []
    assert run_sweep(load_sweep(str(path)), echo=console.append, report=False) == {"finished": 1}
    assert sum(l.startswith("warning: few images:") for l in console) == 1, console
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = next(r for r in c.search_runs([c.get_experiment_by_name("warn").experiment_id])
               if r.data.tags.get("conmim.role") == "trial")
    assert run.info.status == "FINISHED"
    assert "few images:" in run.data.tags["conmim.warning"] and "unbalanced:" in run.data.tags["conmim.warning"]
    result = json.loads((tmp_path / "ray_results" / "warn" / "trials" / "baseline_seed0" / "result.json").read_text())
    assert any(w.startswith("few images:") for w in result["warnings"])
