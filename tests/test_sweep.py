"""Sweeps end to end: real Ray Tune + Ray Train, real MLflow, real Fashion-MNIST images."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from conmim.cli import main
from conmim.config.expand import load_sweep
from conftest import CONMIM, REPO, SMALL, session_actors, wait_for

SWEEP_FILES = sorted((REPO / "sweeps").rglob("*.yaml"))


@pytest.mark.parametrize("path", SWEEP_FILES, ids=[str(p.relative_to(REPO)) for p in SWEEP_FILES])
def test_every_shipped_sweep_passes_dry_run(path):
    res = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "distinct" in res.output


@pytest.mark.parametrize("path", SWEEP_FILES, ids=[str(p.relative_to(REPO)) for p in SWEEP_FILES])
def test_every_shipped_sweep_resolves_at_paper_scale(path, tmp_path):
    """The documented switch to ImageNet scale: --set base=vit-b16-imagenet plus the dataset root."""
    from PIL import Image
    for split in ("train", "val"):
        (tmp_path / split / "n01440764").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "n01440764" / "0.png")
    res = CliRunner().invoke(main, ["sweep", str(path), "--dry-run", "--set", "base=vit-b16-imagenet",
                                    "--set", f"base.set.data.root={tmp_path}"])
    # the config resolves at paper scale; the one-image folder cannot serve it, which the data
    # pre-flight (conmim/data/preflight.py) says after resolving it: exit 2, the paper's batch named
    assert res.exit_code == 2, res.output
    assert "pretrain.batch_size=2048 is larger than the 1 training images" in res.output, res.output
    sw = load_sweep(str(path), ["base=vit-b16-imagenet", f"base.set.data.root={tmp_path}"])
    cfg = sw.distinct[0].config
    assert (cfg.model.name, cfg.model.img_size, cfg.data.name) == ("beit_base_patch16_224", 224, "imagefolder")


def test_ablations_expand_to_expected_trials_and_aliases():
    sw = load_sweep(str(REPO / "sweeps" / "ablations.yaml"))
    assert len(sw.trials) == 7 * 5 and len(sw.distinct) == 6 * 5 and len(sw.aliases) == 5
    assert {t.variant for t in sw.aliases} == {"momentum_no_stop_grad"}
    assert all(t.alias_of.startswith("baseline_seed") for t in sw.aliases)
    assert {t.variant for t in sw.distinct} == {"baseline", "scratch", "no_momentum_encoder", "no_stop_grad",
                                                "no_asymmetry", "momentum_from_zero"}
    zero = next(t for t in sw.distinct if t.variant == "momentum_from_zero").config.objective
    assert (zero.target_encoder, zero.momentum) == ("momentum", 0.0)  # the EMA copy, its schedule from 0
    res = CliRunner().invoke(main, ["sweep", str(REPO / "sweeps" / "ablations.yaml"), "--dry-run"])
    assert "35 trials: 30 distinct, 5 aliases" in res.output and "baseline_seed0" in res.output


def test_only_runs_a_subset_of_the_arms_with_the_baseline():
    """What `make demo` runs (its --set list read from the Makefile): the study's protocol, one seed,
    three arms, and no selection stage (11 more trials would not fit the demo's 20 minutes)."""
    make = (REPO / "Makefile").read_text()
    recipe = make[make.index("\ndemo:"):].split("\n\n")[0].replace("\\\n", " ")
    sets = [a for a in re.findall(r"--set (\S+)", recipe) if not a.startswith(("storage=", "mlflow."))]
    assert "selection=null" in sets and "only=[scratch,no_stop_grad]" in sets, recipe
    sw = load_sweep(str(REPO / "sweeps" / "ablations.yaml"), sets)
    assert sw.spec.selection is None
    assert [t.name for t in sw.trials] == ["baseline_seed0", "scratch_seed0", "no_stop_grad_seed0"]
    # the same trials as the study's at one setting of its budget (tiny's own lr), not look-alikes
    study = load_sweep(str(REPO / "sweeps" / "ablations.yaml"), ["seeds=[0]"])
    lr = sw.trials[0].config.pretrain.lr
    assert lr in study.spec.selection.budget["pretrain.lr"]
    at_lr = {t.name: t.key for t in load_sweep(str(REPO / "sweeps" / "ablations.yaml"),
                                               ["seeds=[0]", f"base.set.pretrain.lr={lr}", "selection=null"]).trials}
    assert {n: at_lr[n] for n in (x.name for x in sw.trials)} == {t.name: t.key for t in sw.trials}


def sweep_file(tmp_path, name, variants, seeds=(0,), **extra):
    spec = {"name": name, "base": {"config": "tiny", "set": dict(SMALL)}, "seeds": list(seeds),
            "variants": variants, "storage": str(tmp_path / "ray_results"),
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, **extra}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def mlflow_runs(uri, experiment):
    from mlflow.tracking import MlflowClient
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c, c.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_sweep_logs_every_trial_once_and_reports(ray_session, tmp_path):
    from conmim.run.tune import run_sweep
    from conmim.trial import machine
    path = sweep_file(tmp_path, "e2e", [
        {"name": "shared_no_stop_grad", "set": {"objective.target_encoder": "shared", "objective.stop_grad": False}},
        {"name": "momentum_no_stop_grad", "set": {"objective.stop_grad": False}},  # alias of baseline
        {"name": "scratch", "set": {"pretrain.enabled": False}},
        {"name": "diverges", "set": {"debug.nan_at_step": 1}},
        # a worker dies (os._exit) with no restart left: FAILED as worker_died, with Ray's error
        {"name": "dies", "set": {"debug.crash_at_step": 1, "resources.max_failures": 0}},
        # an exception in the training code, not a NaN: its train.log cannot be opened (a folder in
        # its place), so the worker raises IsADirectoryError at its first log line
        {"name": "raises", "set": {"resources.max_failures": 0, "objective.temperature": 0.3}},
    ], resources={"max_concurrent_trials": 2})  # two at a time: Train start-up of one overlaps the other's compute
    sw = load_sweep(str(path))
    assert len(sw.distinct) == 6 and len(sw.aliases) == 1
    (sw.dir / "trials" / "raises_seed0" / "train.log").mkdir(parents=True)
    console: list[str] = []
    before = trial_processes()
    counts = run_sweep(sw, echo=console.append)
    assert counts == {"finished": 3, "failed": 3, "alias (finished)": 1}, counts
    # Tune's trial processes are reused (tune.REUSE_TRIAL_PROCESSES): 6 trials, 2 at a time, and the
    # one that raised gets a new process; one process per trial would be 6
    started = trial_processes() - before
    assert len(started) <= 4, started
    failing = ("diverges", "dies", "raises")
    # the console: one line per trial event, each said once; a progress bar; where things are
    for t in sw.distinct:
        label = f"{t.variant} seed {t.seed}"
        mine = [l for l in console if f"  {label} " in l]
        assert sum(l.rstrip().endswith("started") for l in mine) == 1, mine
        ends = [l for l in mine if "  done " in l or "FAILED" in l]
        assert len(ends) == 1 and ("FAILED" in ends[0]) == (t.variant in failing), mine
        if t.variant not in ("scratch", *failing):
            assert sum("pretrain  epoch 1/1  loss" in l for l in mine) == 1, mine
        if t.variant not in failing:
            assert sum("finetune  epoch 1/1  loss" in l for l in mine) == 1, mine
    assert re.search(r"^\[#{24}\] 6/6 trials \(3 failed\), 0 running", console_bars(console)[-1]), console
    ray_log = next(l for l in console if l.startswith("Ray's own messages: ")).split(": ", 1)[1].split(";")[0]
    assert ray_log == str(sw.dir / "ray.log") and (sw.dir / "ray.log").exists()
    assert any(re.search(r"/#/experiments/\d+/runs\?viewStateShareKey=conmim-trials&workflowType=machine_learning$", l) for l in console), console
    assert f"next: conmim ui {sw.dir}" in console[-3], console  # the folder that recorded the store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c, runs = mlflow_runs(uri, "e2e")
    parents = [r for r in runs if r.data.tags.get("conmim.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("conmim.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == sorted(t.name for t in sw.distinct)
    import conmim
    checkout = (Path(conmim.__file__).resolve().parents[1] / ".git").exists()  # (not a non-editable install)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        # the tags README promises on each trial's run, and its own log file
        t = next(t for t in sw.distinct if t.name == r.info.run_name)
        tags = r.data.tags
        assert (tags["conmim.variant"], tags["conmim.seed"], tags["conmim.canonical_hash"]) == (t.variant, "0", t.key), tags
        assert tags["ray.trial_id"], tags
        if checkout:
            assert tags["conmim.git_commit"] == head, tags
        assert r.data.params["objective.temperature"] == ("0.3" if r.info.run_name == "raises_seed0" else "0.1")
        if r.info.run_name == "diverges_seed0":
            assert r.info.status == "FAILED" and "nan" in r.data.tags["conmim.failure_reason"].lower()
            continue
        failed = sw.dir / "trials" / r.info.run_name / "failed.json"
        if r.info.run_name == "dies_seed0":  # out of resources.max_failures: worker_died, Ray's own error
            assert r.info.status == "FAILED" and json.loads(failed.read_text())["kind"] == "worker_died"
            assert r.data.tags["conmim.failure_reason"] == json.loads(failed.read_text())["reason"] != ""
            assert "died at step 1" in (sw.dir / "trials" / "dies_seed0" / ".crash_injected").read_text()
            continue
        if r.info.run_name == "raises_seed0":  # the exception's type and message, as the worker recorded it
            reason = r.data.tags["conmim.failure_reason"]
            assert r.info.status == "FAILED" and reason.startswith("IsADirectoryError: ") and "train.log" in reason
            assert json.loads(failed.read_text())["kind"] == "error"
            continue
        assert r.info.status == "FINISHED" and 0 < r.data.metrics["finetune_top1"] <= 1
        assert tags["conmim.machine"] == machine(), tags  # what a bit-for-bit rerun needs to match
        assert (sw.dir / "trials" / r.info.run_name / "train.log").stat().st_size > 0  # its own log
        assert "config.yaml" in [a.path for a in c.list_artifacts(r.info.run_id)]
        if r.info.run_name != "scratch_seed0":
            hist = c.get_metric_history(r.info.run_id, "pretrain_loss")
            assert len(hist) == 1 and hist[0].step == 1  # per-epoch curve logged live
    base = next(r for r in children if r.info.run_name == "baseline_seed0")
    assert base.data.tags["conmim.aliases"] == "momentum_no_stop_grad_seed0"
    table = pq.read_table(sw.dir / "results.parquet").to_pylist()
    assert len(table) == 7
    assert {r["trial"] for r in table if r["machine"] == machine()} == {
        "baseline_seed0", "momentum_no_stop_grad_seed0", "shared_no_stop_grad_seed0", "scratch_seed0"}  # alias too
    by_name = {row["trial"]: row for row in table}
    for r in children:
        if r.info.status == "FINISHED":
            assert by_name[r.info.run_name]["finetune_top1"] == pytest.approx(r.data.metrics["finetune_top1"])
    assert by_name["momentum_no_stop_grad_seed0"]["alias_of"] == "baseline_seed0"
    assert "nan" in by_name["diverges_seed0"]["reason"].lower()
    assert by_name["raises_seed0"]["reason"].startswith("IsADirectoryError: ") and by_name["dies_seed0"]["reason"]
    # the report: printed table, PNG, numbers from the runs, logged on the parent run
    res = CliRunner().invoke(main, ["report", str(sw.dir)])
    assert res.exit_code == 0, res.output
    assert (sw.dir / "report.png").stat().st_size > 1000
    line = next(l for l in res.output.splitlines() if l.startswith("| scratch |"))
    assert f"{100 * by_name['scratch_seed0']['finetune_top1']:.2f}" in line
    assert "same experiment as baseline" in res.output
    for v in failing:  # each failed arm's row says so
        assert "1 failed" in next(l for l in res.output.splitlines() if l.startswith(f"| {v} |")), res.output
    assert {"report.md", "report.png"} <= {a.path for a in c.list_artifacts(parents[0].info.run_id)}
    # ...and the same report straight from MLflow
    res2 = CliRunner().invoke(main, ["report", "e2e", "--tracking-uri", uri, "--out", str(tmp_path / "rep")])
    assert res2.exit_code == 0 and line in res2.output


def trial_processes() -> set:
    """The ids of the Ray actors that ran Tune function trials in this Ray session, dead or alive."""
    return {a.actor_id for a in session_actors("ImplicitFunc")}


def console_bars(lines):
    return [l for l in lines if l.startswith("[") and " trials (" in l]


@pytest.mark.timeout(1800)
@pytest.mark.slow
def test_killed_then_interrupted_driver_resumes_without_duplicates(tmp_path):
    """The driver is SIGKILLed (no chance to clean up), resumed, interrupted with Ctrl-C (SIGINT:
    trials stop, runs end KILLED, exit 130) and resumed again: every trial ends FINISHED exactly
    once in MLflow and finished trials are never trained again."""
    from mlflow.tracking import MlflowClient
    path = sweep_file(tmp_path, "resume", [{"name": "t02", "set": {"objective.temperature": 0.2}}])
    spec = yaml.safe_load(path.read_text())
    spec["base"]["set"]["pretrain.epochs"] = 4  # long enough to be interrupted mid-training
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sweep_dir = tmp_path / "ray_results" / "resume"

    def driver(*args, log):
        return subprocess.Popen([CONMIM, "sweep", str(path), *args], stdout=open(tmp_path / log, "w"),
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    p = driver(log="driver.log")
    wait_for(lambda: list(sweep_dir.glob("trials/*/result.json")) or p.poll() is not None, 600, "a finished trial")
    assert list(sweep_dir.glob("trials/*/result.json")), (tmp_path / "driver.log").read_text()[-3000:]
    # the second trial started (the driver is killed with it under way)
    wait_for(lambda: (tmp_path / "driver.log").read_text().count("  started") >= 2, 300, "the second trial to start",
             stop=lambda: p.poll() is not None)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    first_done = {q.parent.name: q.stat().st_mtime for q in sweep_dir.glob("trials/*/result.json")}

    # resumed, then Ctrl-C while a trial pre-trains
    p = driver("--resume", log="interrupted.log")
    try:
        wait_for(lambda: "pretrain  epoch" in (tmp_path / "interrupted.log").read_text() or p.poll() is not None,
                 600, "a resumed trial training")
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=180)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    out = (tmp_path / "interrupted.log").read_text()
    assert rc == 130, out[-3000:]
    # the driver's own last line (Ray may still deliver buffered worker log lines after it)
    own = [line for line in out.splitlines() if line.strip() and not re.match(r"(\x1b\[\d+m)?\(", line)]
    assert own[-1].startswith("interrupted: trials stopped") and "--resume" in own[-1], out[-3000:]
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("resume").experiment_id])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    assert next(r for r in runs if r.data.tags.get("conmim.role") == "sweep").info.status == "KILLED"
    stopped = [r for r in runs if r.data.tags.get("conmim.role") == "trial" and r.info.status != "FINISHED"]
    assert stopped and all(r.info.status == "KILLED" and re.search("Ctrl-C|SIGINT", r.data.tags["conmim.failure_reason"])
                           for r in stopped), [(r.info.run_name, r.info.status, r.data.tags) for r in stopped]

    r = subprocess.run([CONMIM, "sweep", str(path), "--resume"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # what the user watched: the sweep's own console, not Ray's (no Tune tables, no TensorBoard hint,
    # no Ray Train internals, no worker line printed twice); the progress counts the earlier runs' trials
    said = r.stdout + r.stderr
    for noise in ("TensorBoard", "Reporting training result", "trial_", "Trial status", "[pretrain] epoch"):
        assert noise not in said, (noise, said[-3000:])
    assert re.search(r"^\[#{24}\] 2/2 trials \(0 failed\)", console_bars(r.stdout.splitlines())[-1]), r.stdout
    assert "report: " in r.stdout and "/#/experiments/" in r.stdout
    runs = c.search_runs([c.get_experiment_by_name("resume").experiment_id])
    children = [x for x in runs if x.data.tags.get("conmim.role") == "trial"]
    assert sorted(x.info.run_name for x in children) == ["baseline_seed0", "t02_seed0"]
    assert all(x.info.status == "FINISHED" for x in runs), [(x.info.run_name, x.info.status) for x in runs]
    assert not [x.info.run_name for x in runs if "conmim.failure_reason" in x.data.tags]
    for name, mtime in first_done.items():  # finished trials were not trained again
        assert (sweep_dir / "trials" / name / "result.json").stat().st_mtime == mtime


def test_unreachable_mlflow_is_exit_2_before_ray(tmp_path):
    path = sweep_file(tmp_path, "nomlflow", [], mlflow={"tracking_uri": "http://127.0.0.1:9"})
    r = subprocess.run([CONMIM, "sweep", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "mlflow.tracking_uri" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "ray_results" / "nomlflow" / "sweep.json").exists()


@pytest.mark.parametrize("text,key", [
    ("name: x\nbase: tiny\nvariants:\n  - name: a\n    set: {objective.tau: 1}\n", "objective.tau"),
    ("name: x\nbase: tiny\ngrid:\n  objective.temperature: []\n", "grid"),
    ("name: x\nbase: tiny\nvariants:\n  - {name: a}\n  - {name: a}\n", "duplicate"),
    ("name: x\nbase: tiny\nseeds: [a, b]\n", "seeds"),
    ("name: x\nbase: nosuchpreset\n", "nosuchpreset"),
    ("name: x\nbase: tiny\nsearch: random\n", "search"),
    ("name: x\nbase: tiny\nscheduler: asha\n", "asha"),
    ("name: x\nbase: tiny\nbogus: 1\n", "bogus"),
    ("name: x\nbase: tiny\nvariants:\n  - {name: a}\nonly: [b]\n", "only"),
])
def test_bad_sweep_file_exits_2(tmp_path, text, key):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    res = CliRunner().invoke(main, ["sweep", str(p), "--dry-run"])
    assert res.exit_code == 2 and key in res.output, res.output


def test_trial_process_never_loads_the_model_or_the_data(tmp_path):
    """What a Tune trial's own process runs around ``fit()`` imports no torch, timm or dataset
    code: the result record is made in the Train worker. A process per trial would otherwise pay
    ~6 s of a core and ~250 MB for nothing. (``_trainer`` is stubbed: Ray's TorchTrainer, the
    one thing there that needs torch, is Ray's to import.)"""
    code = f"""
import sys
from pathlib import Path
from pathlib import Path
import conmim.run.ray_train as d, conmim.run.tune_trial
from conmim.config import load_config
from conmim.trial import TrialResult
class Done:
    return_value = TrialResult({{"finetune_top1": 0.5}}, {{}}, {{}}, "h", {{}}, node_id="n1")
d._trainer = lambda *a, **k: None
d._fit = lambda trainer, out: Done
res = d.run_trial(load_config("tiny", []), Path({str(tmp_path)!r}))
heavy = {{"torch", "timm", "torchvision", "conmim.data.sources", "conmim.method.vit", "conmim.train.pretrain"}}
print(sorted(heavy & set(sys.modules)), res.timings["wall_seconds"] >= 0, res.node_id)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["[]", "True", "n1"], p.stdout
    assert json.loads((tmp_path / "result.json").read_text())["finetune_top1"] == 0.5


def test_sqlite_artifacts_live_beside_the_database(tmp_path, monkeypatch):
    """A sweep's SQLite MLflow is one folder to keep or delete: artifacts go beside ``mlflow.db``,
    not into ``./mlruns`` of whatever folder the sweep was started from."""
    from conmim.tracking import client as tracking
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    exp = tracking.experiment_id(uri, "beside")
    run = tracking.parent_run(uri, exp, "beside", None)
    tracking.log_config(uri, run, {"seed": 0}, tmp_path / "config.yaml")
    assert [p.name for p in (db.parent / "mlruns").rglob("config.yaml")] == ["config.yaml"]
    assert not (elsewhere / "mlruns").exists()


def test_sweep_resources_are_the_experiments_keys_set_in_one_place(tmp_path):
    """The sweep's `resources` section is the experiment's `resources` schema (every key, e.g.
    threads_per_worker and max_failures, which a field-by-field copy once dropped) plus Tune's
    max_concurrent_trials; a key also set by base.set or a variant is refused, not silently ranked."""
    p = tmp_path / "s.yaml"
    p.write_text("name: s\nbase: tiny\nresources: {threads_per_worker: 1, max_failures: 5, num_workers: 2, "
                 "max_concurrent_trials: 3}\nvariants:\n  - {name: t02, set: {objective.temperature: 0.2}}\n")
    sw = load_sweep(str(p))
    for t in sw.trials:
        r = t.config.resources
        assert (r.threads_per_worker, r.max_failures, r.num_workers) == (1, 5, 2)
    assert sw.spec.resources.max_concurrent_trials == 3
    p.write_text("name: s\nbase: tiny\nresources: {num_workers: 2}\nvariants:\n"
                 "  - {name: w1, set: {resources.num_workers: 1}}\n")
    res = CliRunner().invoke(main, ["sweep", str(p), "--dry-run"])
    assert res.exit_code == 2 and "resources.num_workers" in res.output and "one place" in res.output, res.output
    p.write_text("name: s\nbase: tiny\nresources: {cpus_per_worker: 0}\n")
    res = CliRunner().invoke(main, ["sweep", str(p), "--dry-run"])  # the experiment's limits hold here too
    assert res.exit_code == 2 and "resources.cpus_per_worker" in res.output, res.output


def test_an_old_key_says_where_it_went(tmp_path):
    res = CliRunner().invoke(main, ["validate", "tiny", "--set", "pretrain.max_failures=3"])
    assert res.exit_code == 2 and "resources.max_failures" in res.output, res.output
