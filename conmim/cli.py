"""The ``conmim`` command line."""
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
        from conmim.train.session import LocalSession
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
        from conmim.train.session import LocalSession
        res = run(cfg, LocalSession(out, "finetune"), ckpt.encoder_weights(Path(checkpoint), cfg.finetune.encoder))
        res.pop("finetune_history")
    else:
        from conmim.run.ray_train import finetune_on_ray
        res = finetune_on_ray(cfg, Path(checkpoint).resolve(), out, address=address)
    click.echo(json.dumps(res, indent=2, default=float))


@main.command()
@click.argument("sweep_file")
@click.option("--set", "sets", multiple=True,
              help="Override a key of the sweep file, e.g. --set base=demo --set seeds=[0] (repeatable).")
@click.option("--dry-run", is_flag=True, help="Print the trial table and counts; start nothing.")
@click.option("--resume", is_flag=True, help="Continue the sweep in its storage: finished trials are not re-run.")
@click.option("--address", default=None,
              help="Submit the sweep as a Ray job to the cluster whose dashboard is here (http://127.0.0.1:8265 "
                   "through a tunnel, or https://...); "
                   "default: run it on a local Ray (or the one RAY_ADDRESS names).")
@click.option("--no-follow", is_flag=True, help="With --address: print the job id and return; do not stream the logs.")
@click.option("--resume-if-exists", is_flag=True,
              help="Resume when the sweep folder exists and was made by this same sweep (file and --set), else start "
                   "it; refuse a folder of another sweep. For jobs re-submitted unchanged (a re-created RayJob).")
@click.option("--insecure-http", is_flag=True,
              help="With --address: send the Ray token over plain http:// to a host that is not this machine "
                   "(refused otherwise: use https:// or a tunnel to 127.0.0.1).")
@click.option("--configs", "show_configs", is_flag=True,
              help="With --dry-run: also print the sweep's own settings and every distinct trial's resolved "
                   "config (YAML, credentials masked).")
@click.option("--secret-sets", type=click.Path(dir_okay=False), default=None, hidden=True,
              help="A JSON list of further --set values (applied after the others): how `sweep --address` passes "
                   "credentials to the job without putting them in its entrypoint.")
@friendly_errors
def sweep(sweep_file, sets, dry_run, resume, address, no_follow, resume_if_exists, insecure_http, show_configs,
          secret_sets):
    """Run an ablation sweep: Ray Tune trials, each pre-trained and fine-tuned on Ray Train,
    every trial an MLflow run, results in STORAGE/NAME/results.parquet and a report.

    With --address the project is shipped to the cluster and the sweep runs there as a Ray job;
    Ctrl-C stops following its logs and leaves the job running (conmim jobs stop ends it)."""
    from conmim.config.expand import load_sweep, selection_stage, trial_table
    if resume and resume_if_exists:
        raise UsageProblem("--resume and --resume-if-exists: give one (--resume requires the sweep folder; "
                           "--resume-if-exists resumes it only when it exists and holds this same sweep).")
    if secret_sets:
        from conmim.run.secret_sets import read_secret_sets
        sets = tuple(sets) + tuple(read_secret_sets(secret_sets))
    if address and not dry_run:
        _submit_sweep(sweep_file, sets, resume, address, not no_follow, resume_if_exists, insecure_http)
        return
    sw = load_sweep(sweep_file, list(sets), check_paths=not address)  # a cluster's data lives on the cluster
    stage = selection_stage(sw, check_paths=not address) if sw.spec.selection else None
    if dry_run:
        from conmim.data.preflight import check_sweep
        check_sweep(sw, local_only=bool(address), echo=click.echo)
        if stage is not None:
            click.echo(f"selection stage ({stage.spec.name}): each arm at every setting of selection.budget\n"
                       f"{trial_table(stage)}\n\n{len(stage.trials)} trials: {len(stage.distinct)} distinct, "
                       f"{len(stage.aliases)} aliases\n\ncomparison ({sw.spec.name}): each arm at the setting the "
                       f"selection stage chooses (shown here at the budget's first)")
        click.echo(trial_table(sw))
        extra = f", Optuna samples: {sw.spec.optuna.num_samples}" if sw.spec.search == "optuna" else ""
        click.echo(f"\n{len(sw.trials)} trials: {len(sw.distinct)} distinct, {len(sw.aliases)} aliases{extra}")
        if show_configs:
            click.echo(_resolved_configs(sw))
        return
    from conmim.run import tune
    if resume_if_exists:
        resume = any([tune.resume_if_exists(stage) if stage is not None else False, tune.resume_if_exists(sw)])
        click.echo(f"--resume-if-exists: {'resuming the existing' if resume else 'starting the new'} sweep folder "
                   f"{sw.dir}")
    try:
        if stage is not None:
            from conmim.run.selection import run_two_stage
            sw, counts = run_two_stage(sw, list(sets), resume, echo=click.echo, check_paths=not address)
        else:
            counts = tune.run_sweep(sw, resume=resume, echo=click.echo)
    except KeyboardInterrupt as e:
        how = getattr(e, "signame", "SIGINT")  # SIGTERM: `ray job stop` / `conmim jobs stop`
        click.echo(f"\n{'interrupted' if how == 'SIGINT' else 'stopped (' + how + ')'}: trials stopped, their "
                   f"MLflow runs ended as KILLED. Continue with: conmim sweep {sweep_file} --resume", err=True)
        sys.exit(130 if how == "SIGINT" else 143)
    click.echo(f"sweep '{sw.spec.name}' done: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    click.echo(f"results: {sw.dir / 'results.parquet'}\nreport:  {sw.dir / 'report.md'}")
    report_path = sw.dir / "report.md"
    if report_path.exists():
        click.echo(report_path.read_text())


def _resolved_configs(sw) -> str:
    """The sweep's own settings and each distinct trial's resolved config, as a YAML stream with
    credentials masked: what `sweep --dry-run --configs` prints."""
    import yaml
    from conmim.tracking.redact import redact_text
    spec = sw.spec.model_dump(mode="json", exclude={"variants", "base", "grid", "optuna"})
    docs = [f"--- # sweep {sw.spec.name}\n" + yaml.safe_dump(spec, sort_keys=False)]
    docs += [f"--- # trial {t.name}\n" + t.config.to_yaml() for t in sw.distinct]
    return redact_text("".join(docs))


def _submit_sweep(sweep_file, sets, resume, address, follow_logs, resume_if_exists=False, insecure_http=False):
    from conmim.run import jobs
    try:
        jc, job_id = jobs.submit_sweep(sweep_file, sets, resume, address, echo=click.echo,
                                       resume_if_exists=resume_if_exists, insecure_http=insecure_http)
    except jobs.JobsError as e:
        raise UsageProblem(str(e)) from None
    click.echo(jobs.hints(job_id, address))
    if not follow_logs:
        return
    click.echo("streaming the job's logs (Ctrl-C stops following; the job keeps running)")
    try:
        final = jobs.follow(jc, job_id, lambda text: click.echo(text, nl=False))
    except KeyboardInterrupt:
        click.echo(f"\nstopped following: job {job_id} is still running on the cluster. Stop it with:\n"
                   f"  conmim jobs stop {job_id} --address {address}", err=True)
        sys.exit(130)
    except jobs.JobsError as e:
        raise UsageProblem(str(e)) from None
    click.echo(f"\njob {job_id}: {final}")
    if final != "SUCCEEDED":
        sys.exit(1)


ADDRESS_OPTION = click.option("--address", required=True, envvar="RAY_API_SERVER_ADDRESS",
                              help="The Ray dashboard's address, e.g. http://127.0.0.1:8265 "
                                   "(or set RAY_API_SERVER_ADDRESS).")
INSECURE_HTTP_OPTION = click.option(
    "--insecure-http", is_flag=True,
    help="Send the Ray token over plain http:// to a host that is not this machine (refused otherwise: "
         "use https:// or a tunnel to 127.0.0.1).")


@main.group()
def jobs():
    """Sweeps submitted to a cluster (conmim sweep FILE --address): status, logs, stop."""


def _jobs_call(fn, *a, **kw):
    from conmim.run.jobs import JobsError
    try:
        return fn(*a, **kw)
    except JobsError as e:
        raise UsageProblem(str(e)) from None


@jobs.command("status")
@click.argument("job_id")
@ADDRESS_OPTION
@INSECURE_HTTP_OPTION
def jobs_status(job_id, address, insecure_http):
    """Print the job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and details."""
    from conmim.run import jobs as j
    click.echo(json.dumps(_jobs_call(j.status, address, job_id, insecure_http=insecure_http), indent=2))


@jobs.command("logs")
@click.argument("job_id")
@ADDRESS_OPTION
@click.option("--follow", "-f", "follow_logs", is_flag=True, help="Keep streaming until the job ends.")
@INSECURE_HTTP_OPTION
def jobs_logs(job_id, address, follow_logs, insecure_http):
    """Print the job's driver output (the sweep's progress)."""
    from conmim.run import jobs as j
    try:
        final = _jobs_call(j.logs, address, job_id, follow_logs, lambda text: click.echo(text, nl=False),
                           insecure_http=insecure_http)
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; job {job_id} keeps running.", err=True)
        sys.exit(130)
    if final:
        click.echo(f"\njob {job_id}: {final}")


@jobs.command("stop")
@click.argument("job_id")
@ADDRESS_OPTION
@click.option("--timeout", default=90, show_default=True, help="Seconds to wait for the job to end.")
@INSECURE_HTTP_OPTION
def jobs_stop(job_id, address, timeout, insecure_http):
    """Stop the job: its driver gets SIGTERM and ends the trials' MLflow runs as KILLED."""
    from conmim.run import jobs as j
    final = _jobs_call(j.stop, address, job_id, timeout, insecure_http=insecure_http)
    click.echo(f"job {job_id}: {final}")
    if final not in ("STOPPED", "SUCCEEDED", "FAILED"):
        click.echo(f"still {final} after {timeout} s; check again with: conmim jobs status {job_id} --address {address}",
                   err=True)
        sys.exit(1)


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
    os.execv(cmd[0], cmd)  # the server is this process: stopping it stops the UI


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
