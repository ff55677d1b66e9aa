"""The metrics of a trial: names, and on which split each is measured. One home, read by the
sweep schema (what a search may select on, what a report may show), the trial's result record,
the results table and the report. Torch-free."""
from __future__ import annotations

# The final metrics of a trial: a column each in results.parquet, a metric each on the MLflow run.
FINAL_METRICS = ("finetune_top1", "finetune_val_top1", "linear_probe_top1", "knn_top1", "final_pretrain_loss",
                 "final_target_std",
                 # probes of the online encoder (eval.probe_online), the full-label fine-tune of a low-label
                 # study (eval.full_label_finetune), and the positional-shortcut diagnostics (train/diagnostics.py)
                 "linear_probe_online_top1", "knn_online_top1", "finetune_full_top1", "finetune_full_val_top1",
                 "all_masked_loss", "position_spread")
# Wall seconds of the phases of a trial.
TIMINGS = ("pretrain_seconds", "probe_seconds", "finetune_seconds", "wall_seconds")
# Flags of a trial whose numbers measure a failure rather than the ablated component.
FLAGS = ("collapsed", "at_chance", "positional_shortcut", "diverged")

# Measured on the validation split: the only metrics a search (optuna.metric, asha.metric) may
# select on. Every other *_top1 is measured on the test split. Add a new validation metric here.
VALIDATION_METRICS = ("finetune_val_top1", "knn_proxy_top1", "finetune_full_val_top1", "knn_proxy_online_top1")
