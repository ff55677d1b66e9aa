"""``conmim jobs status|logs|stop``: sweeps submitted to a cluster (``conmim sweep FILE --address``)."""
from __future__ import annotations

import json
import sys

import click

from conmim.cli import UsageProblem, main


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
