"""``conmim sweep``: a sweep file run here on a local Ray (or the one RAY_ADDRESS names), or
submitted to a cluster as a Ray job (``--address``)."""
from __future__ import annotations

import sys

import click

from conmim.cli import UsageProblem, friendly_errors, main


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
