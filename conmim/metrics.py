"""The metrics of a trial: names, and on which split each is measured. One home, read by the
sweep schema (what a search may select on, what a report may show), the trial's result record,
the results table and the report. Torch-free."""
from __future__ import annotations

# The final metrics of a trial: a column each in results.parquet, a metric each on the MLflow run.
FINAL_METRICS = ("finetune_top1", "finetune_val_top1", "linear_probe_top1", "knn_top1", "final_pretrain_loss",
                 "final_target_std")
# Wall seconds of the phases of a trial.
TIMINGS = ("pretrain_seconds", "probe_seconds", "finetune_seconds", "wall_seconds")
# Flags of a trial whose numbers measure a failure rather than the ablated component.
FLAGS = ("collapsed", "at_chance")

# Measured on the validation split: the only metrics a search (optuna.metric, asha.metric) may
# select on. Every other *_top1 is measured on the test split. Add a new validation metric here.
VALIDATION_METRICS = ("finetune_val_top1", "knn_proxy_top1")
