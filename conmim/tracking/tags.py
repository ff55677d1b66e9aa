"""The names of the tags a sweep puts on its MLflow runs, written by the sweep and read back by
the report: one home, so that the two cannot drift apart."""

TRIAL = "conmim.trial"                 # the trial's name, on its child run: how a resumed sweep finds it
SWEEP = "conmim.sweep"                 # the sweep's name, on its parent run
ROLE = "conmim.role"                   # "sweep" (parent) or "trial" (child)
REASON = "conmim.failure_reason"       # why a run ended FAILED or KILLED
VARIANT = "conmim.variant"
SEED = "conmim.seed"
CANONICAL_HASH = "conmim.canonical_hash"
ALIASES = "conmim.aliases"             # names of the trials that are the same experiment
ALIAS_RECORDS = "conmim.alias_records"  # ... as JSON records (the report's rows from MLflow)
OVERRIDES = "conmim.overrides"
NOTE = "conmim.note"
GIT_COMMIT = "conmim.git_commit"
NODE_ID = "conmim.node_id"             # where rank 0 trained
MACHINE = "conmim.machine"             # ... on what: CPU, torch kernels, torch, GPU (trial.machine)
WARNING = "conmim.warning"             # collapsed or diverged pre-training, chance-level fine-tune, shortcut
PROBE_ENCODER = "conmim.probe_encoder"
REPORT_METRIC = "conmim.report.metric"      # on the parent run: the report's primary metric
REPORT_BASELINE = "conmim.report.baseline"  # ... and the variant every delta is taken against
STAGE = "conmim.stage"                 # "selection": a run of a two-stage sweep's selection stage
RAY_TRIAL_ID = "ray.trial_id"
PARENT_RUN_ID = "mlflow.parentRunId"
NOTE_CONTENT = "mlflow.note.content"        # a run's description in the MLflow UI: the sweep's report
EXPERIMENT_KIND = "mlflow.experimentKind"   # on the experiment: which MLflow 3 view opens it
TRAINING_KIND = "custom_model_development"  # ... the model-training view, not the GenAI one
TRIALS_VIEW_KEY = "conmim-trials"         # the experiment's saved runs-table view: the trials, flat, with metrics
TRIALS_VIEW = "mlflow.sharedViewState." + TRIALS_VIEW_KEY  # ... the experiment tag MLflow 3 reads it from
