"""The MLflow UI a sweep points to: the printed `conmim ui ...` command run as printed opens the
sweep's store (started with --set storage/tracking_uri from another folder), the rendered pages in
headless Chromium show the trials, their finetune_top1 and the ablation table; a missing store or
one without the sweep is refused with exit 2 and nothing is created."""
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conmim.cli import main
from conftest import CONMIM, REPO, SMALL

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = REPO / "docs" / "img" / "mlflow-sweep.png"
TRIALS_SCREENSHOT = REPO / "docs" / "img" / "mlflow-trials.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dbs(*roots):
    return sorted(str(p) for r in roots for p in Path(r).rglob("*.db"))


def write_sweep(path: Path, name: str) -> Path:
    """A tiny sweep file with no storage and no tracking_uri of its own: --set chooses them."""
    path.write_text(yaml.safe_dump({"name": name, "base": {"config": "tiny", "set": dict(SMALL)}, "seeds": [0],
                                    "variants": [{"name": "scratch", "set": {"pretrain.enabled": False}}]}))
    return path


@pytest.fixture(scope="module")
def sweep_elsewhere(tmp_path_factory, ray_session):
    """A finished tiny sweep (baseline + scratch, one seed), started from folder `cwd` with
    --set mlflow.tracking_uri=sqlite:///ELSEWHERE/mlflow.db --set storage=ELSEWHERE, with
    MLFLOW_TRACKING_URI naming another store (conmim does not read it: the config names the store)."""
    root = tmp_path_factory.mktemp("ui")
    cwd, elsewhere = root / "cwd", root / "elsewhere"
    cwd.mkdir(), elsewhere.mkdir()
    f = write_sweep(root / "uisweep.yaml", "uisweep")
    old, old_env = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(cwd)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/from-env.db"
    try:
        res = CliRunner().invoke(main, ["sweep", str(f), "--set", f"mlflow.tracking_uri=sqlite:///{elsewhere}/mlflow.db",
                                        "--set", f"storage={elsewhere}"])
    finally:
        os.chdir(old)
        if old_env is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env
    assert res.exit_code == 0, res.output[-3000:]
    return {"root": root, "cwd": cwd, "elsewhere": elsewhere, "output": res.output, "file": f}


def printed_ui(output: str) -> tuple[str, list[str]]:
    """The `conmim ui ...` command and the links the sweep printed at its end."""
    lines = output.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith("next: conmim ui "))
    cmd = lines[i][len("next: "):].split("   ")[0]
    return cmd, [l.split(": ", 1)[1] for l in lines[i + 1:i + 3]]


class UiServer:
    """The printed command, run as printed by a shell in ``cwd`` (the venv's bin first on PATH),
    on a free port (CONMIM_UI_PORT); waits for /health with a deadline; killed with its group."""

    def __init__(self, cmd: str, cwd: Path, deadline_s: float = 300):
        self.port = free_port()
        env = {**os.environ, "PATH": f"{Path(CONMIM).parent}:{os.environ['PATH']}", "CONMIM_UI_PORT": str(self.port),
               "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/from-env.db"}  # not read: the printed command names the store
        self.log = cwd / "ui.log"
        self.proc = subprocess.Popen(cmd, shell=True, cwd=cwd, env=env, stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"
        end = time.time() + deadline_s
        while True:
            try:
                if urllib.request.urlopen(self.base + "/health", timeout=5).read().strip() == b"OK":
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > end:
                self.stop()
                raise AssertionError(f"conmim ui did not answer: {self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def api(self, path: str, body: dict | None = None) -> dict:
        """MLflow's REST API on this server: GET, or POST with a JSON ``body``."""
        import json
        req = urllib.request.Request(self.base + "/ajax-api/2.0/mlflow/" + path,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=30).read())

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def ui_server(sweep_elsewhere):
    cmd, _ = printed_ui(sweep_elsewhere["output"])
    server = UiServer(cmd, sweep_elsewhere["cwd"])
    yield server
    server.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)  # whichever runs first builds the module's sweep: 100 s, 227 s at half speed
def test_sweep_elsewhere_prints_one_table_and_a_ui_command_for_its_store(sweep_elsewhere):
    out, elsewhere = sweep_elsewhere["output"], sweep_elsewhere["elsewhere"]
    cmd, links = printed_ui(out)
    assert cmd == f"conmim ui {elsewhere / 'uisweep'}", cmd  # the folder that recorded the store
    assert sum(l.startswith("| baseline |") for l in out.splitlines()) == 1, out  # the table, once
    assert dbs(sweep_elsewhere["root"]) == [str(elsewhere / "mlflow.db")]  # none in cwd, none from the env
    from mlflow.tracking import MlflowClient
    c = MlflowClient(f"sqlite:///{elsewhere}/mlflow.db")
    exp = c.get_experiment_by_name("uisweep")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parent_link, trials_link = links
    assert f"/#/experiments/{exp.experiment_id}/runs/" in parent_link
    parent = c.get_run(re.search(r"/runs/([0-9a-f]+)", parent_link).group(1))
    assert parent.info.experiment_id == exp.experiment_id and parent.data.tags["conmim.role"] == "sweep"
    assert "| scratch |" in parent.data.tags["mlflow.note.content"]
    assert "delta_finetune_top1/scratch" in parent.data.metrics
    assert f"/#/experiments/{exp.experiment_id}/runs?viewStateShareKey=conmim-trials&" in trials_link
    view = json.loads(exp.tags["mlflow.sharedViewState.conmim-trials"])  # the saved view the link opens
    state = json.loads(view["state"])
    assert state["orderByKey"] == "metrics.`finetune_top1`" and "metrics.`finetune_top1`" in state["selectedColumns"]


@pytest.mark.slow
@pytest.mark.timeout(600)  # whichever runs first builds the module's sweep: 100 s, 227 s at half speed
def test_printed_command_opens_the_store_holding_the_sweep(sweep_elsewhere, ui_server):
    """Run literally from the folder the sweep started in: its server holds the sweep's experiment
    and its runs, and no database appeared anywhere."""
    exp = ui_server.api("experiments/get-by-name?experiment_name=uisweep")["experiment"]
    _, links = printed_ui(sweep_elsewhere["output"])
    assert f"/#/experiments/{exp['experiment_id']}/runs/" in links[0]  # the printed ids are this store's
    runs = ui_server.api("runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100}).get("runs", [])
    names = {r["info"]["run_name"] for r in runs}
    assert {"uisweep", "baseline_seed0", "scratch_seed0"} <= names, names
    assert dbs(sweep_elsewhere["root"]) == [str(sweep_elsewhere["elsewhere"] / "mlflow.db")]


# True when the element is laid out and no ancestor that clips (overflow hidden, e.g. MLflow's folded
# description) cuts it off vertically: what a person sees without expanding anything.
UNCLIPPED_JS = """el => { const r = el.getBoundingClientRect(); if (r.height <= 0) return false;
  for (let a = el.parentElement; a; a = a.parentElement) { const s = getComputedStyle(a);
    if (s.overflowY === 'hidden' || s.overflow === 'hidden') { const q = a.getBoundingClientRect();
      if (r.top < q.top - 1 || r.bottom > q.bottom + 1) return false; } }
  return true; }"""


def unclipped(page, locator, timeout_ms: float = 30_000) -> bool:
    """Waits (with a deadline) until ``locator``'s element is shown unclipped: the page lays a
    table out in steps, so one early measurement may see it taller than it ends up."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    try:
        page.wait_for_function(UNCLIPPED_JS,
                               arg=locator.element_handle(), timeout=timeout_ms)
        return True
    except PlaywrightTimeout:
        return False


def browser():
    from playwright.sync_api import sync_playwright
    pw = sync_playwright().start()
    b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    return pw, b


@pytest.mark.slow
@pytest.mark.timeout(600)  # whichever runs first builds the module's sweep: 100 s, 227 s at half speed
def test_mlflow_ui_in_chromium_shows_the_trials_and_the_ablation_table(sweep_elsewhere, ui_server, tmp_path):
    """The printed links in headless Chromium, nothing clicked: the trials link shows each trial as
    a row of the runs table with its finetune_top1 (not folded under the sweep's row), the sweep's
    page shows the ablation table (its description); under "Show more" the description also lists
    the trials and the forest plot."""
    import pyarrow.parquet as pq
    _, links = printed_ui(sweep_elsewhere["output"])
    rows = {r["trial"]: r for r in pq.read_table(sweep_elsewhere["elsewhere"] / "uisweep" / "results.parquet").to_pylist()}
    exp = ui_server.api("experiments/get-by-name?experiment_name=uisweep")["experiment"]
    runs = ui_server.api("runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    run_ids = {r["info"]["run_name"]: r["info"]["run_id"] for r in runs}
    pw, b = browser()
    try:
        ctx = b.new_context(viewport={"width": 1600, "height": 1100})
        page = ctx.new_page()
        page.goto(links[1].replace("http://127.0.0.1:5000", ui_server.base))
        page.get_by_text("matching runs").first.wait_for(timeout=180_000)  # the runs table
        page.get_by_text("scratch_seed0").first.wait_for(timeout=30_000)  # ... its trials unfolded
        for name in ("baseline_seed0", "scratch_seed0"):  # the grid's row: pinned name cells + metric cells
            cells = page.locator(f'[role="row"][row-id="{run_ids[name]}"]')
            cells.first.wait_for(timeout=60_000)
            parts = [cells.nth(i) for i in range(cells.count()) if cells.nth(i).inner_text().strip()]
            assert parts and all(unclipped(page, p) for p in parts), name  # not folded or cut off
            text = " ".join(p.inner_text() for p in parts)
            shown = [float(x) for x in re.findall(r"\d+\.\d+", text)]
            assert name in text and any(abs(x - rows[name]["finetune_top1"]) < 5e-5 for x in shown), (name, text)
        header = page.locator('[role="columnheader"]').all_inner_texts()
        assert "finetune_top1" in " ".join(header), header
        if os.environ.get("CONMIM_SAVE_SCREENSHOT"):
            page.screenshot(path=str(TRIALS_SCREENSHOT))
        page.goto(links[0].replace("http://127.0.0.1:5000", ui_server.base))
        scratch_row = page.locator("td", has_text=re.compile(r"^\s*scratch\s*$")).first  # the table's answer
        scratch_row.wait_for(timeout=180_000)
        assert unclipped(page, scratch_row), "the table is folded away"
        text = page.inner_text("body")
        assert "Ablation: uisweep" in text and re.search(r"scratch\s+pretrain.enabled=False", text), text[:3000]
        assert not unclipped(page, page.get_by_text("baseline_seed0").first, 3_000)  # the check sees folding
        page.get_by_text("Show more").first.click()  # MLflow folds a description after a few lines
        for name in ("baseline_seed0", "scratch_seed0"):  # each trial with its finetune_top1
            page.get_by_text(name).first.wait_for(timeout=60_000)
        text = page.inner_text("body")
        for name in ("baseline_seed0", "scratch_seed0"):
            assert re.search(rf"{name}\s+finished\s+{rows[name]['finetune_top1']:.4f}", text), (name, text[:3000])
        if os.environ.get("CONMIM_SAVE_SCREENSHOT"):
            page.screenshot(path=str(SCREENSHOT), full_page=True)
    finally:
        b.close()
        pw.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)  # whichever runs first builds the module's sweep: 100 s, 227 s at half speed
def test_resumed_sweep_republishes_its_page(sweep_elsewhere):
    """When a resumed sweep finishes, its run page is written again: the description (the table),
    the forest plot artifact and the Δ metrics, replacing what an earlier, interrupted run left
    (made stale here by hand). Runs after the browser test: it restarts the sweep's parent run."""
    from mlflow.tracking import MlflowClient
    elsewhere = sweep_elsewhere["elsewhere"]
    c = MlflowClient(f"sqlite:///{elsewhere}/mlflow.db")
    parent_id = json.loads((elsewhere / "uisweep" / "sweep.json").read_text())["parent_run_id"]
    before = c.get_run(parent_id).data
    delta = "delta_finetune_top1/scratch"
    c.set_tag(parent_id, "mlflow.note.content", "stale: the report of an interrupted run")
    c.log_metric(parent_id, delta, 99.0, step=0)
    plot = Path(c.get_run(parent_id).info.artifact_uri.removeprefix("file://")) / "report.png"
    plot.unlink()  # the sweep's local artifact store: the plot must come back
    old = os.getcwd()
    os.chdir(sweep_elsewhere["cwd"])
    try:
        res = CliRunner().invoke(main, ["sweep", str(sweep_elsewhere["file"]), "--resume",
                                        "--set", f"mlflow.tracking_uri=sqlite:///{elsewhere}/mlflow.db",
                                        "--set", f"storage={elsewhere}"])
    finally:
        os.chdir(old)
    assert res.exit_code == 0, res.output[-3000:]
    assert not any(l.rstrip().endswith("started") for l in res.output.splitlines()), res.output  # none re-run
    after = c.get_run(parent_id)
    assert after.info.status == "FINISHED"
    assert after.data.tags["mlflow.note.content"] == before.tags["mlflow.note.content"], "description not rewritten"
    assert after.data.metrics[delta] == before.metrics[delta] != 99.0
    assert "report.png" in [a.path for a in c.list_artifacts(parent_id)]


def test_ui_refuses_a_store_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "does" / "not" / "exist.db"
    r = subprocess.run([CONMIM, "ui", "--tracking-uri", f"sqlite:///{missing}", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no MLflow store at" in r.stderr and "never creates" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one paragraph
    assert dbs(tmp_path) == [] and not (tmp_path / "does").exists()


def test_ui_refuses_a_store_without_the_sweep_and_names_the_known_ones(tmp_path, monkeypatch):
    from conmim.tracking import client as tracking
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other" / "mlflow.db"
    other.parent.mkdir()
    tracking.experiment_id(f"sqlite:///{other}", "someone-else")
    known = tmp_path / "runs" / "demo"  # a sweep folder as a sweep leaves it: its store recorded
    known.mkdir(parents=True)
    (known / "sweep.json").write_text(f'{{"name": "demo", "experiment": "demo", "tracking_uri": '
                                      f'"sqlite:///{tmp_path}/runs/mlflow.db", "experiment_id": "1"}}')
    f = write_sweep(tmp_path / "s.yaml", "mine")
    before = dbs(tmp_path)
    for args in (["ui", str(f), "--set", f"mlflow.tracking_uri=sqlite:///{other}"],
                 ["ui", "runs/demo", "--tracking-uri", f"sqlite:///{other}"]):
        r = subprocess.run([CONMIM, *args, "--port", str(free_port())], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "holds no experiment" in r.stderr and "'someone-else'" in r.stderr, r.stderr
        assert f"sqlite:///{tmp_path}/runs/mlflow.db with sweep 'demo' (conmim ui runs/demo)" in r.stderr, r.stderr
    r = subprocess.run([CONMIM, "ui", "runs/demo", "--port", str(free_port())], capture_output=True, text=True,
                       timeout=120)  # the recorded store itself is gone: refused, not re-created
    assert r.returncode == 2 and "no MLflow store at" in r.stderr, r.stderr
    assert dbs(tmp_path) == before == [str(other)]


def test_relative_sqlite_uri_is_recorded_absolute(tmp_path, monkeypatch):
    from conmim.tracking.stores import absolute_uri
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert absolute_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"




def test_raylet_messages_go_to_the_sweeps_ray_log(tmp_path, capsys):
    """The raylet's messages to the driver (the worker start-up concurrency WARNING) are printed by
    Ray's error-listener thread through ray._private.worker.print_to_stdstream: after
    send_ray_logs_to they land in ray.log, and a worker's own output still reaches its printer."""
    import ray._private.worker as ray_worker
    from conmim.run.console import send_ray_logs_to
    log = send_ray_logs_to(tmp_path / "ray.log")
    msg = "WARNING: 12 PYTHON worker processes have been started on node: x, which is 3x the maximum expected startup concurrency (4)."
    ray_worker.print_to_stdstream({"lines": [msg], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    ray_worker.print_to_stdstream({"lines": ["hello from a worker"], "pid": 123, "ip": "127.0.0.1", "is_err": False,
                                   "task_name": "w", "actor_name": "", "job": "01"}, ignore_prefix=False)
    out = capsys.readouterr().out
    assert "maximum expected startup concurrency" not in out and "hello from a worker" in out, out
    assert f"(raylet) {msg}" in log.read_text()


def test_the_sweeps_page_shows_the_table_before_the_reports_flags(tmp_path):
    """MLflow folds a description after a few lines: the table comes right after the title, and a
    report's ⚠ lines (a shortcut, a divergence) follow it instead of pushing it under the fold (the
    demo's no_stop_grad arm did)."""
    from conmim.report import publish_on_parent
    from conmim.tracking import client as mlflow_runs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = mlflow_runs.client(uri)
    run_id = c.create_run(c.create_experiment("page")).info.run_id
    md = "\n".join(["# Ablation: page", "", "Primary metric ...", "",
                    "**⚠ 1 of 3 finished trials solved the pre-training task by position** (no_stop_grad): ...", "",
                    "| variant | what changed | finetune_top1 |", "|---|---|---|",
                    "| baseline | the base configuration | 76.30 |", "| no_stop_grad | no stop-gradient | 71.23 |"])
    publish_on_parent(uri, run_id, md, "report.png", [], rows=[{"trial": "baseline_seed0", "status": "finished",
                                                                 "finetune_top1": 0.763}])
    note = c.get_run(run_id).data.tags["mlflow.note.content"].splitlines()
    assert note[0] == "**Ablation: page**" and note[2:6] == [  # cut to its answer: one short line a row
        "| variant | finetune_top1 |", "| --- | --- |", "| baseline | 76.30 |", "| no_stop_grad | 71.23 |"]
    assert note.index(next(l for l in note if l.startswith("**⚠"))) > 6
    assert "| baseline_seed0 | finished | 0.7630 |" in note and note[-1] == "Primary metric ..."
    assert "| no_stop_grad | no stop-gradient | 71.23 |" in note  # the whole table too, further down
