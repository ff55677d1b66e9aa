"""The ``conmim`` command line: the group, its error handling, the one-trial commands, report, ui
and data here; ``conmim sweep`` in :mod:`.sweep_cmd`, ``conmim jobs`` in :mod:`.jobs_cmd`."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from conmim.config import ConfigError, load_config

SET_HELP = "Override a config key, e.g. --set objective.temperature=0.2 (repeatable)."


class UsageProblem(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"conmim: error: {self.format_message()}", err=True)


def friendly_errors(fn):
    """Bad input -> one paragraph on stderr and exit code 2, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from conmim.config.data_paths import DataMissing
        try:
            return fn(*a, **kw)
        except (ConfigError, DataMissing) as e:
            raise UsageProblem(str(e)) from None
    return wrapper


def _data_preflight(cfg, label: str, phases=None) -> list[str]:
    """The data pre-flight (conmim.data.preflight): a config its data cannot serve is a ConfigError
    (exit 2) before anything starts; the warnings are printed and returned."""
    from conmim.config.loading import preset_names
    from conmim.data.preflight import check
    warnings = check(cfg, f"preset '{label}'" if label in preset_names() else label, phases)
    for w in warnings:
        click.echo(f"conmim: warning: {w}", err=True)
    return warnings


def _print_result(result, out: Path) -> None:
    from conmim.trial import RESULT_FILE
    click.echo(json.dumps(result.summary(), indent=2))
    click.echo(f"result: {out / RESULT_FILE}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """ConMIM ablations: pre-train, fine-tune, sweep and report.

    CONFIG arguments take a YAML file or a preset name (tiny, demo, vit-s16-imagenet,
    vit-b16-imagenet). Bad configs exit with code 2 and say which key is wrong.
    """


@main.command()
@click.argument("config")
@click.option("--set", "sets", multiple=True, help=SET_HELP)
@friendly_errors
def validate(config, sets):
    """Print the resolved config (and its canonical id), or say what is wrong with it."""
    from conmim.config import canonical_hash
    from conmim.data.preflight import describe
    cfg = load_config(config, list(sets))
    _data_preflight(cfg, config)
    click.echo(cfg.to_yaml(), nl=False)
    click.echo(f"# data: {describe(cfg)}")
    click.echo(f"# canonical experiment id: {canonical_hash(cfg)}")
    click.echo(f"# per-worker batch: {cfg.batch_split()}")


def _run_options(fn):
    fn = click.option("--set", "sets", multiple=True, help=SET_HELP)(fn)
    fn = click.option("--out", type=click.Path(file_okay=False), default="runs/train", show_default=True,
                      help="Folder for result.json and checkpoints.")(fn)
    fn = click.option("--backend", type=click.Choice(["ray", "process"]), default="ray", show_default=True,
                      help="ray: Ray Train workers (resources.* of the config); process: this process only.")(fn)
    fn = click.option("--address", default=None, help="Join this Ray cluster (default: start a local Ray).")(fn)
    return fn


@main.command()
@click.argument("config")
@_run_options
@friendly_errors
def train(config, sets, out, backend, address):
    """Pre-train, probe and fine-tune one configuration; writes OUT/result.json."""
    cfg = load_config(config, list(sets))
    warnings = _data_preflight(cfg, config)
    out = Path(out).resolve()
    if backend == "process":
        from conmim.trial import run_in_process
        result = run_in_process(cfg, out, warnings=warnings)
    else:
        from conmim.run.ray_train import run_on_ray
        result = run_on_ray(cfg, out, address=address, warnings=warnings)
    _print_result(result, out)


@main.command()
@click.argument("config")
@_run_options
@friendly_errors
def pretrain(config, sets, out, backend, address):
    """Pre-train only; prints the final loss and the folder of the last checkpoint."""
    cfg = load_config(config, list(sets))
    _data_preflight(cfg, config, ("pretrain",))
    out = Path(out).resolve()
    if backend == "process":
        from conmim.train.pretrain import pretrain as run
        from conmim.train.session import LocalSession, set_threads
        set_threads(cfg.resources.threads)
        session = LocalSession(out, "pretrain")
        loss, ckpt = run(cfg, session)["final_pretrain_loss"], session.checkpoint_dir
    else:
        from conmim.run.ray_train import pretrain_on_ray
        ckpt, loss = pretrain_on_ray(cfg, out, address=address)
    click.echo(json.dumps({"final_pretrain_loss": loss, "checkpoint": str(ckpt)}, indent=2))


@main.command()
@click.argument("config")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, file_okay=False),
              help="A pre-training checkpoint folder (holding state.pt).")
@_run_options
@friendly_errors
def finetune(config, checkpoint, sets, out, backend, address):
    """Fine-tune the encoder of a pre-training checkpoint (finetune.encoder picks which)."""
    cfg = load_config(config, list(sets))
    out = Path(out).resolve()
    if not (Path(checkpoint) / "state.pt").exists():
        raise UsageProblem(f"--checkpoint {checkpoint}: no state.pt inside; pass a folder written by 'conmim pretrain'.")
    _data_preflight(cfg, config, ("finetune",))
    if backend == "process":
        from conmim.train import checkpoint as ckpt
        from conmim.train.finetune import finetune as run
        from conmim.train.session import LocalSession, set_threads
        set_threads(cfg.resources.threads)
        res = run(cfg, LocalSession(out, "finetune"), ckpt.encoder_weights(Path(checkpoint), cfg.finetune.encoder))
        res.pop("finetune_history")
    else:
        from conmim.run.ray_train import finetune_on_ray
        res = finetune_on_ray(cfg, Path(checkpoint).resolve(), out, address=address)
    click.echo(json.dumps(res, indent=2, default=float))


@main.command()
@click.argument("source")
@click.option("--tracking-uri", default=None, help="MLflow store when SOURCE is an experiment name (default: ./mlflow.db).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Where report.md/report.png go.")
@click.option("--metric", default=None, help="Another metric as the table's primary (default: the sweep file's "
              "report.metric), e.g. knn_top1; written to report_METRIC.md/.png.")
@friendly_errors
def report(source, tracking_uri, out, metric):
    """Ablation table of a sweep: SOURCE is a sweep folder or an MLflow experiment name."""
    from conmim.report import make_report
    try:
        res = make_report(source, tracking_uri, Path(out) if out else None, metric)
    except FileNotFoundError as e:
        raise UsageProblem(str(e)) from None
    click.echo(res["markdown"])
    click.echo(f"wrote {res['report']} and {res['png']}")


@main.command()
@click.argument("source", required=False)
@click.option("--set", "sets", multiple=True,
              help="With a sweep file: the overrides the sweep was started with (e.g. --set storage=runs "
                   "--set mlflow.tracking_uri=sqlite:///...), so that the UI opens the store it wrote to.")
@click.option("--tracking-uri", default=None, help="MLflow store (default: the sweep's, else ./mlflow.db).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address; keep loopback unless you must.")
@click.option("--port", default=5000, show_default=True, envvar="CONMIM_UI_PORT", help="Also $CONMIM_UI_PORT.")
@friendly_errors
def ui(source, sets, tracking_uri, host, port):
    """Start the MLflow UI on a sweep's store and print the sweep's pages in it.

    SOURCE is a sweep folder (STORAGE/NAME, e.g. runs/demo: the store its sweep recorded) or a
    sweep file with the --set overrides the sweep was started with. A store that does not exist,
    or lacks the sweep's experiment, is refused (exit 2); none is ever created."""
    import os
    from conmim.tracking import stores
    from conmim.tracking.client import ui_links
    from conmim.tracking.redact import redact_uri
    target = stores.resolve(source, list(sets), tracking_uri)
    if not stores.port_free(host, port):
        raise UsageProblem(f"--port {port}: {host}:{port} is in use (another MLflow UI?); pass another --port "
                           f"or set CONMIM_UI_PORT.")
    click.echo(f"MLflow UI: http://{host}:{port}  (store: {redact_uri(target.uri)}); Ctrl-C stops it")
    if target.experiment_id:
        for label, url in ui_links(f"http://{host}:{port}", target.experiment_id, target.parent_run_id):
            click.echo(f"  {label}: {url}")
    sys.stdout.flush()
    cmd = stores.server_command(target.uri, host, port)
    os.execve(cmd[0], cmd, stores.server_env())  # the server is this process: stopping it stops the UI


@main.group()
def data():
    """Dataset utilities."""


@data.command("prepare")
@click.argument("dataset", type=click.Choice(["fashion-mnist"]))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--root", default=None, help="Folder of the idx files (default: Debian's dataset-fashion-mnist).")
@click.option("--limit", type=int, default=None, help="At most N images per split.")
@friendly_errors
def data_prepare(dataset, out, root, limit):
    """Write DATASET as a Parquet file of PNG bytes, labels and split (usable as data.name=parquet)."""
    from conmim.config.experiment import DataConfig
    from conmim.config.data_paths import DataMissing, missing_data_message
    from conmim.data.sources import write_parquet
    msg = missing_data_message(DataConfig(name=dataset, root=root))
    if msg:
        raise DataMissing(msg)
    n = write_parquet(dataset, out, root, limit)
    click.echo(f"wrote {n} images to {out}")


# the commands of their own modules (they register on `main`)
from conmim.cli import jobs_cmd, sweep_cmd  # noqa: E402,F401
