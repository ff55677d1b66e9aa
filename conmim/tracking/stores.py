"""Which MLflow store a sweep wrote to, and what ``conmim ui`` may open.

A sweep records its store (an absolute URI) in ``STORAGE/NAME/sweep.json``; ``conmim ui`` opens
that store, or the one a sweep file (with the same ``--set`` overrides) or ``--tracking-uri``
names, only after checking that it exists and holds the sweep's experiment. MLflow itself would
create an empty SQLite database for a path that does not exist and show "No Experiment with id=1
exists"; here that is a ConfigError (exit 2) naming the stores this folder knows about."""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from conmim.config.errors import ConfigError
from conmim.config.uris import absolute_uri, sqlite_file
from conmim.tracking.redact import redact_uri


def experiments(uri: str) -> dict[str, str]:
    """Active experiments of the store, name -> id. A SQLite store is read read-only (nothing is
    created, migrated or locked); FileNotFoundError when its file does not exist, ValueError when
    the file is no MLflow store."""
    db = sqlite_file(uri)
    if db is None:
        from conmim.tracking import client as mlflow_runs
        return {e.name: e.experiment_id for e in mlflow_runs.retry(mlflow_runs.client(uri).search_experiments, tries=2)}
    if not db.is_file():
        raise FileNotFoundError(str(db))
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT experiment_id, name FROM experiments WHERE lifecycle_stage = 'active'").fetchall()
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{db} is not an MLflow store ({e})") from None
    finally:
        con.close()
    return {name: str(i) for i, name in rows}


def recorded_sweeps(roots: list[Path]) -> list[dict]:
    """``sweep.json`` of every sweep folder directly under ``roots`` (plus ``dir``: the folder)."""
    found, seen = [], set()
    for root in roots:
        for p in sorted(Path(root).glob("*/sweep.json")) if Path(root).is_dir() else []:
            if p.resolve() in seen:
                continue
            seen.add(p.resolve())
            try:
                state = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(state, dict) and state.get("tracking_uri"):
                found.append({**state, "dir": p.parent})
    return found


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies inside it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def ui_command(sweep_dir: Path) -> str:
    """The command that opens the store a sweep recorded in its folder."""
    return f"conmim ui {_shown(sweep_dir)}"


def known_stores(roots: list[Path]) -> str:
    """One sentence naming the stores the sweep folders under ``roots`` recorded (and ./mlflow.db)."""
    by_uri: dict[str, list[str]] = {}
    for s in recorded_sweeps(roots):
        by_uri.setdefault(s["tracking_uri"], []).append(f"'{s.get('experiment') or s.get('name')}' "
                                                        f"(conmim ui {_shown(s['dir'])})")
    if Path("mlflow.db").is_file():
        by_uri.setdefault(absolute_uri("sqlite:///mlflow.db"), [])
    if not by_uri:
        where = ", ".join(_shown(r) for r in roots)
        return (f"No store is known here: no sweep folder under {where} records one and there is no ./mlflow.db; "
                f"run a sweep first (make demo), or name a sweep folder, a sweep file or --tracking-uri.")
    parts = [f"{redact_uri(u)}" + (f" with sweep {', '.join(s)}" if s else "") for u, s in by_uri.items()]
    return "Stores known here: " + "; ".join(parts) + "."


@dataclass
class Target:
    """What ``conmim ui`` opens: the store, and the sweep's experiment and parent run in it."""
    uri: str
    experiment: Optional[str] = None
    experiment_id: Optional[str] = None
    parent_run_id: Optional[str] = None


def resolve(source: Optional[str], sets: list[str], tracking_uri: Optional[str]) -> Target:
    """The store and sweep of ``conmim ui [SOURCE] [--set ...] [--tracking-uri URI]``: SOURCE is a
    sweep folder (its ``sweep.json``) or a sweep file (with the sweep's ``--set`` overrides).
    ConfigError (exit 2) when the store does not exist, is no MLflow store, or lacks the sweep."""
    from conmim.config.sweep import default_tracking_uri
    roots = [Path("runs"), Path("ray_results")]
    state: dict = {}
    experiment = None
    if source and Path(source).is_dir():
        p = Path(source) / "sweep.json"
        if not p.is_file():
            raise ConfigError(f"conmim ui {source}: not a sweep folder (it has no sweep.json, which a sweep writes when "
                              f"it starts). {known_stores(roots + [Path(source), Path(source).parent])}")
        if sets:
            raise ConfigError(f"conmim ui {source}: --set applies to a sweep file, not to a sweep folder (the folder "
                              f"records the store its sweep used).")
        state = json.loads(p.read_text())
        uri, experiment = state["tracking_uri"], state.get("experiment") or state.get("name")
        roots.append(Path(source).parent)
    elif source:
        from conmim.config.expand import load_sweep
        sw = load_sweep(source, list(sets), check_paths=False)
        uri, experiment = sw.tracking_uri, sw.experiment
        p = sw.dir / "sweep.json"
        state = json.loads(p.read_text()) if p.is_file() else {}
        roots.append(Path(sw.spec.storage))
    else:
        if sets:
            raise ConfigError("conmim ui: --set needs a sweep file (conmim ui SWEEP_FILE --set KEY=VALUE).")
        uri = default_tracking_uri()
    uri = absolute_uri(tracking_uri or uri)
    label = redact_uri(uri)
    try:
        exps = experiments(uri)
    except FileNotFoundError:
        raise ConfigError(f"conmim ui: there is no MLflow store at {label} (no such file); conmim ui opens only an "
                          f"existing store and never creates an empty one. {known_stores(roots)}") from None
    except ValueError as e:
        raise ConfigError(f"conmim ui: {e}. {known_stores(roots)}") from None
    except Exception as e:  # noqa: BLE001 - a server that does not answer
        raise ConfigError(f"conmim ui: the MLflow store {label} does not answer ({e}). {known_stores(roots)}") from None
    if experiment is None:
        return Target(uri)
    if experiment not in exps:
        holds = ", ".join(f"'{n}'" for n in sorted(exps)) or "none"
        raise ConfigError(f"conmim ui: the MLflow store {label} holds no experiment '{experiment}' (it holds: {holds}), "
                          f"so the sweep's runs are not there. {known_stores(roots)}")
    exp_id = exps[experiment]
    parent = state.get("parent_run_id") if str(state.get("experiment_id")) == exp_id else None
    if parent is None:
        from conmim.tracking import client as mlflow_runs
        from conmim.tracking import tags as T
        runs = mlflow_runs.find_runs(uri, exp_id, f"tags.`{T.ROLE}` = 'sweep'")
        parent = runs[0].info.run_id if runs else None
    return Target(uri, experiment, exp_id, parent)


def port_free(host: str, port: int) -> bool:
    import socket
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def server_command(uri: str, host: str, port: int) -> list[str]:
    """``mlflow server`` on ``uri``: one worker (a UI for one person, on a machine that also
    trains); a SQLite store's artifacts served from beside its database, where the sweep put them."""
    import sys
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", uri, "--host", host,
           "--port", str(port), "--workers", "1"]
    db = sqlite_file(uri)
    if db is not None:
        cmd += ["--artifacts-destination", str(db.resolve().parent / "mlruns")]
    return cmd


# MLflow 3's server starts seven Huey job consumers of its own (GenAI jobs: prompt optimisation,
# scorers, trace roll-ups), each a Python importing MLflow: 92 against 31 CPU s per start on 2 cores
# (benchmarks/mlflow_server.py). Nothing here uses them; a user who does sets it.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def server_env() -> dict[str, str]:
    """The environment for ``mlflow server``: this one, with SERVER_ENV's defaults under it."""
    import os
    return {**SERVER_ENV, **os.environ}


__all__ = ["SERVER_ENV", "Target", "absolute_uri", "experiments", "known_stores", "port_free", "recorded_sweeps", "resolve",
           "server_command", "server_env", "ui_command"]
