"""The data pre-flight: a config that is valid on its own but cannot work on the data it points
at is refused before anything starts (:class:`~conmim.config.ConfigError`, exit 2), one paragraph
naming the key, its value and what the data allows.

It reads only what is cheap to know (:class:`DataFacts`): each split's labels as the loaders
would split them (:func:`conmim.data.listing.split_plan`: ``data.val_size``, ``data.subset``,
``data.eval_subset``), the class count, and a decoded sample of each split (size, mode), never the
images themselves. Data that is possible but suspicious (a class with very few images, a heavily
unbalanced split) gives warnings: printed, tagged on the trial's MLflow run (``conmim.warning``)
and kept in ``result.json``.

To add a check of a source (a shard manifest, say), append a function to :data:`SOURCE_CHECKS`:
it gets the :class:`~conmim.config.experiment.DataConfig` and returns a problem (one sentence
naming the key) or None; it runs before the facts are read. Readers may also raise
:class:`~conmim.config.data_paths.DataMissing`, which is reported the same way."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from conmim.config.errors import ConfigError
from conmim.config.experiment import DataConfig, ExperimentConfig
from conmim.data.facts import RGB_MODES, SPLITS, DataFacts, DataMissing, few, read_facts
from conmim.data.listing import VAL_FRACTION_CAP, held_out

PHASES = ("pretrain", "probe", "finetune")
FEW_IMAGES = 10        # a training class with fewer images than this is suspicious
UNBALANCED = 10.0      # ... and so is a split whose largest class is this many times its smallest



def _shard_manifest(dcfg: DataConfig) -> Optional[str]:
    """A folder of Parquet shards is the complete set its ``_manifest.json`` describes (listing and
    sizes; object storage is checked where it is read, with the nodes' credentials)."""
    if dcfg.name != "parquet" or "://" in str(dcfg.root) or not Path(str(dcfg.root)).is_dir():
        return None
    from conmim.data.manifest import manifest_problem
    problem = manifest_problem(str(dcfg.root))
    return problem.rstrip(".") if problem else None


# Checks of a source that need no facts: DataConfig -> a problem or None.
SOURCE_CHECKS: list[Callable[[DataConfig], Optional[str]]] = [_shard_manifest]


@dataclass
class Verdict:
    failures: list[str]
    warnings: list[str]


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------
def phases_of(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The phases a whole trial runs (``conmim train`` and every sweep trial)."""
    return tuple(p for p in PHASES if p != "pretrain" or cfg.pretrain.enabled)


def _largest_batch(n: int, step: int) -> str:
    k = (n // step) * step
    return f"at most {k} (a multiple of {step})" if k else f"none: the split is smaller than {step} images"


def judge(cfg: ExperimentConfig, facts: DataFacts, phases: tuple[str, ...]) -> Verdict:
    """Every way ``cfg`` cannot work on ``facts`` (failures) and what is only suspicious (warnings)."""
    d, fail, warn = cfg.data, list(facts.problems), []
    train, val, test = (facts.labels[s] for s in SPLITS)
    counts = facts.counts("train")
    w = cfg.resources.num_workers
    subset_note = f" (data.subset={d.subset})" if d.subset else ""

    # the splits themselves
    if d.val_size >= facts.source_train > 0:
        fail.append(f"data.val_size={d.val_size} is not below the {facts.source_train} images of the training source "
                    f"(data.root={d.root or 'default'}), and at most 1/{VAL_FRACTION_CAP} of them is held out for "
                    f"validation; allowed: at most {facts.source_train // VAL_FRACTION_CAP}")
    elif d.val_size > held_out(facts.source_train, d.val_size):
        warn.append(f"data.val_size={d.val_size} is capped at 1/{VAL_FRACTION_CAP} of the {facts.source_train} "
                    f"training-source images: validation gets {held_out(facts.source_train, d.val_size)}")
    if not len(train):
        fail.append(f"the training split is empty: data.root={d.root or 'default'} ({d.name}) holds no training "
                    f"images the loader finds")
    for split in ("val", "test"):
        if len(train) and not len(facts.labels[split]):
            why = ("data.val_size=0 holds none out" if d.val_size == 0 else
                   f"the training source has {facts.source_train} images, and 1/{VAL_FRACTION_CAP} of them is "
                   f"{facts.source_train // VAL_FRACTION_CAP}")
            fail.append(f"the {split} split is empty ({why}" + (" and the source has no test split" if split == "test"
                        else "") + f"); set data.val_size to at least 1 (at most "
                        f"{facts.source_train // VAL_FRACTION_CAP}) or add images")
            break
    if len(train) and len(counts) < 2:
        only = facts.name(next(iter(counts)))
        fail.append(f"the training split{subset_note} has {len(counts)} class ({only}); classification needs at least "
                    f"2 (data.root={d.root or 'default'})")
    for split in ("val", "test"):
        absent = sorted(set(facts.labels[split].tolist()) - set(counts))
        if absent and len(counts) >= 2:
            in_source = all(c in facts.source_train_classes for c in absent)
            key = f"data.subset={d.subset}" if d.subset and in_source else f"data.root={d.root or 'default'}"
            fail.append(f"{key}: the {split} split has classes the training split lacks "
                        f"({few([facts.name(c) for c in absent])}); a classifier cannot learn them"
                        + ("; raise data.subset" if key.startswith("data.subset") else ""))
            break

    # the phases' batches
    if "pretrain" in phases and len(train):
        p, step = cfg.pretrain, w * cfg.pretrain.accumulate
        if p.batch_size > len(train):
            fail.append(f"pretrain.batch_size={p.batch_size} is larger than the {len(train)} training images"
                        f"{subset_note}: an epoch has no full batch (each of resources.num_workers={w} workers computes "
                        f"pretrain.accumulate={p.accumulate} micro-batches of {cfg.micro_batch('pretrain')}); allowed: "
                        f"{_largest_batch(len(train), step)}, or more training images")
        if cfg.eval.proxy_every and cfg.eval.knn_k > min(len(train), 10000):
            fail.append(f"eval.knn_k={cfg.eval.knn_k} is more neighbours than the {len(train)} training images of the "
                        f"k-NN proxy (eval.proxy_every={cfg.eval.proxy_every}); allowed: at most {len(train)}")
    if "probe" in phases and len(train) and cfg.eval.knn and cfg.eval.knn_k > len(train):
        fail.append(f"eval.knn_k={cfg.eval.knn_k} is more neighbours than the {len(train)} training images the k-NN "
                    f"probe votes with{subset_note}; allowed: at most {len(train)}")
    if "finetune" in phases and len(train):
        f, step = cfg.finetune, w * cfg.finetune.accumulate
        labelled = len(train)
        if f.labels_per_class:
            smallest = min(counts, key=lambda c: (counts[c], c))
            if f.labels_per_class > counts[smallest]:
                fail.append(f"finetune.labels_per_class={f.labels_per_class} is more than the smallest training class "
                            f"has: {facts.name(smallest)} has {counts[smallest]} images{subset_note}; allowed: at most "
                            f"{counts[smallest]}, or more training images")
            labelled = sum(min(n, f.labels_per_class) for n in counts.values())
        if f.batch_size > labelled:
            what = (f"the {labelled} labelled images (finetune.labels_per_class={f.labels_per_class} x "
                    f"{len(counts)} classes)" if f.labels_per_class else f"the {labelled} training images{subset_note}")
            fail.append(f"finetune.batch_size={f.batch_size} is larger than {what}: an epoch has no full batch (each of "
                        f"resources.num_workers={w} workers computes finetune.accumulate={f.accumulate} micro-batches of "
                        f"{cfg.micro_batch('finetune')}); allowed: {_largest_batch(labelled, step)}")

    # the images
    for split, (width, height, mode) in facts.sample.items():
        if mode not in RGB_MODES:
            fail.append(f"data.root: the {split} images are of mode {mode}, which the loaders cannot turn into RGB")
            break
        if min(width, height) * 2 < cfg.model.img_size:
            warn.append(f"model.img_size={cfg.model.img_size}: the {split} images are {width}x{height}, upsampled more "
                        f"than 2x")
            break

    # suspicious, not impossible
    if len(counts) >= 2:
        rare = sorted(c for c, n in counts.items() if n < FEW_IMAGES)
        if rare:
            warn.append(f"few images: the training split has fewer than {FEW_IMAGES} images of "
                        f"{few([f'{facts.name(c)} ({counts[c]})' for c in rare])}")
        for split in ("train", "test"):
            c = facts.counts(split)
            if len(c) >= 2 and max(c.values()) >= UNBALANCED * min(c.values()):
                big, small = max(c, key=c.get), min(c, key=c.get)
                warn.append(f"unbalanced: the {split} split has {c[big]} images of {facts.name(big)} but "
                            f"{c[small]} of {facts.name(small)}")
    if facts.test_is_val:
        warn.append("no test split: the source has no test images, so test metrics are measured on the validation "
                    "split")
    return Verdict(fail, warn)


def _source_problems(dcfg: DataConfig) -> list[str]:
    return [p for check in SOURCE_CHECKS if (p := check(dcfg))]


def _verdict(cfg: ExperimentConfig, phases: tuple[str, ...]) -> Verdict:
    problems = _source_problems(cfg.data)
    if problems:
        return Verdict(problems, [])
    try:
        facts = read_facts(cfg.data)
    except DataMissing as e:
        return Verdict([str(e).rstrip(".")], [])
    return judge(cfg, facts, phases)


def refusal(label: str, failures: list[str]) -> str:
    return (f"{label}: the config does not fit its data: " + "; ".join(failures)
            + ". Nothing was started.")


def check(cfg: ExperimentConfig, label: str, phases: Optional[tuple[str, ...]] = None) -> list[str]:
    """Refuse (ConfigError) a config that cannot work on its data; returns the warnings."""
    v = _verdict(cfg, phases if phases is not None else phases_of(cfg))
    if v.failures:
        raise ConfigError(refusal(label, v.failures))
    return v.warnings


def check_sweep(sweep, local_only: bool = False, echo: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Every distinct trial of ``sweep`` against its data (read once per distinct data config),
    before anything starts; ConfigError naming the trials that cannot work. Returns each trial's
    warnings. ``local_only``: skip data that is not on this machine (a cluster sweep's; the job
    checks it there, before its first trial)."""
    from conmim.config.data_paths import missing_data_message
    failures: dict[str, list[str]] = {}
    warnings: dict[str, list[str]] = {}
    skipped = set()
    for t in sweep.distinct:
        d = t.config.data
        if local_only and (missing_data_message(d) or "://" in str(d.root or "")):
            skipped.add(str(d.root))
            continue
        v = _verdict(t.config, phases_of(t.config))
        for f in v.failures:
            failures.setdefault(f, []).append(t.name)
        warnings[t.name] = v.warnings
    for root in sorted(skipped):
        echo(f"data pre-flight: data.root={root} is not on this machine; the sweep checks it on the cluster "
             f"before its first trial")
    if failures:
        parts = [f"{f} (trial{'s' if len(names) > 1 else ''} {few(names)})" for f, names in failures.items()]
        raise ConfigError(refusal(f"{sweep.path}", parts))
    return warnings


def describe(cfg: ExperimentConfig) -> str:
    """One line on the data as a run would see it (``conmim validate``)."""
    return read_facts(cfg.data).summary()
