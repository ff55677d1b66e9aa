"""The Ray Train callback that sends every report of rank 0 to the trial's MLflow run as it
happens. Imports Ray: only the trial's process, which runs the Train run, needs it."""
from __future__ import annotations

from pathlib import Path

from ray.train import UserCallback

from conmim.tracking.buffer import log_metrics_buffered


class EpochLogger(UserCallback):
    """Per-epoch metrics to the run ``run_id`` (buffered in ``pending`` while the server is down);
    a fine-tuning phase's keys get its name as a prefix (``finetune_``, ``finetune_full_``), so the
    phases' curves live side by side."""

    def __init__(self, uri: str, run_id: str, pending: Path):
        self.uri, self.run_id, self.pending = uri, run_id, pending

    def after_report(self, run_context, metrics, checkpoint):
        m = dict(metrics[0])
        phase = m.pop("phase", "pretrain")
        step = int(m.pop("epoch", 0))
        m.pop("step", None)
        if phase != "pretrain":
            m = {k if k.startswith(phase) else f"{phase}_{k}": v for k, v in m.items()}
        log_metrics_buffered(self.uri, self.run_id, m, step, self.pending)
