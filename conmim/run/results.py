"""The sweep's results table, ``results.parquet``: one row per trial (aliases included), made
from what the trials left on disk (``result.json`` or ``failed.json``), never from memory, so a
resumed or crashed sweep writes the same table."""
from __future__ import annotations

import json
import os
from pathlib import Path

from conmim.metrics import FINAL_METRICS, FLAGS
from conmim.trial import TrialResult, result_row

FAILED_FILE = "failed.json"


def trial_records(sweep_dir: Path) -> list[dict]:
    """The expansion (``trials.json``) and the trials Optuna sampled (``trials/optuna_*/trial.json``)."""
    records = json.loads((sweep_dir / "trials.json").read_text())
    trials = sweep_dir / "trials"
    for f in sorted(trials.glob("optuna_*/trial.json")) if trials.exists() else []:
        records.append(json.loads(f.read_text()))
    return records


def collect_rows(sweep_dir: Path) -> list[dict]:
    rows, done = [], {}
    for rec in trial_records(sweep_dir):
        if rec["alias_of"] is not None:
            rows.append(rec)  # filled below, from the trial it is the same experiment as
            continue
        out = sweep_dir / "trials" / rec["name"]
        result = TrialResult.read(out)
        if result is not None:
            row = result_row(rec, "finished", result)
        elif (out / FAILED_FILE).exists():
            row = result_row(rec, "failed", reason=json.loads((out / FAILED_FILE).read_text())["reason"])
        else:
            row = result_row(rec, "pending")
        done[rec["name"]] = row
        rows.append(row)
    for i, rec in enumerate(rows):  # an alias carries the numbers of the trial it is the same experiment as
        if "trial" not in rec:
            src = done.get(rec["alias_of"], {})
            row = result_row(rec, f"alias ({src.get('status', 'pending')})")
            for k in FINAL_METRICS + FLAGS + ("node_id", "machine"):
                row[k] = src.get(k, row[k])
            rows[i] = row
    return rows


def write_results(sweep_dir: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pylist(collect_rows(sweep_dir))
    tmp = sweep_dir / ".results.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, sweep_dir / "results.parquet")
    return sweep_dir / "results.parquet"
