"""``--set`` values that hold credentials, kept out of a Ray job's entrypoint and metadata.

A job's entrypoint, metadata and runtime_env are shown to everyone with the cluster's token
(``ray job list``, the dashboard, ``conmim jobs status``); so the credential-bearing values travel in
a private file of the job's working_dir instead, and what is printed or stored is masked."""
from __future__ import annotations

import json
import os
from pathlib import Path

from conmim.config.errors import ConfigError

JOB_DIR = ".conmim-job"        # where a sweep file from outside the project travels
SECRET_SETS = f"{JOB_DIR}/secret-sets.json"   # --set values holding credentials travel here, not in the entrypoint


def is_secret_set(s: str) -> bool:
    """A ``--set KEY=VALUE`` whose key or value looks like a credential (a URI's user:password@,
    a ``?token=``, a value of a secret-looking environment variable, a key named like a password)."""
    from conmim.tracking.redact import redact_text, redact_value
    key, sep, value = s.partition("=")
    return redact_text(s) != s or bool(sep) and redact_value(key.strip(), value) != value


def shown_set(s: str) -> str:
    """A ``--set`` as it may be printed or stored: credentials masked."""
    from conmim.tracking.redact import redact_text, redact_value
    key, sep, value = s.partition("=")
    masked = redact_value(key.strip(), value) if sep else value
    return redact_text(f"{key}{sep}{masked}")


def split_secret_sets(sets) -> tuple[list[str], list[str]]:
    """(the ``--set`` values that may be shown, the ones that hold credentials), each in order."""
    plain, secret = [], []
    for s in sets:
        (secret if is_secret_set(s) else plain).append(s)
    return plain, secret


def write_secret_sets(work: Path, secret: list[str]) -> str:
    """The credential-bearing ``--set`` values as a private file of the job's working_dir; returns
    its path inside it. The Ray job's entrypoint, metadata and runtime_env (which ``ray job list``,
    the dashboard and ``conmim jobs status`` show to everyone with the cluster's token) then name
    the file, never the values; the driver reads it (``conmim sweep --secret-sets``)."""
    path = work / SECRET_SETS
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(list(secret), f)
    return SECRET_SETS


def read_secret_sets(path) -> list[str]:
    """The ``--set`` values of a file written by :func:`write_secret_sets` (``conmim sweep --secret-sets``)."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--secret-sets {path}: cannot read it as a JSON list of --set values ({e}).") from None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"--secret-sets {path}: expected a JSON list of KEY=VALUE strings.")
    return values
