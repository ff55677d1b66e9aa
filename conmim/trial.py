"""One trial: pre-train under one config, probe the frozen encoder, fine-tune; and its result, the
one record a trial leaves (``result.json``) and the one row schema of ``results.parquet``.

``run_phases`` is what a Ray Train worker (:mod:`conmim.run.ray_train`) and ``conmim train
--backend process`` both run. This module imports torch only inside the phases: a Tune trial's
process reads results without loading the model or the data."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from conmim.config.experiment import ExperimentConfig
from conmim.config.identity import canonical_hash
from conmim.files import write_json
from conmim.metrics import FINAL_METRICS, FLAGS, TIMINGS

CHANCE_MARGIN = 0.05  # a top-1 within 5 points of chance counts as "at chance"
COLLAPSE_STD = 0.1    # normalised target features with spread below this have collapsed
RESULT_FILE = "result.json"


@dataclass
class TrialResult:
    """What a finished trial measured. ``result.json`` is this record, flat (a metric is a top-level key)."""
    metrics: dict[str, float]                 # FINAL_METRICS
    timings: dict[str, float]                 # TIMINGS
    flags: dict[str, bool]                    # FLAGS
    canonical_hash: str
    config: dict
    pretrain_history: list = field(default_factory=list)
    finetune_history: list = field(default_factory=list)
    node_id: str = ""
    machine: str = ""                         # where rank 0 trained: CPU, its torch kernels, torch, GPU (machine())
    probe_encoder: str = ""                   # the encoder knn_top1 / linear_probe_top1 were measured on
    step_losses: Optional[list] = None
    warnings: list = field(default_factory=list)  # the data pre-flight's (conmim.data.preflight)

    def to_json(self) -> dict:
        d = {**self.metrics, **self.flags, **self.timings}
        rest = asdict(self)
        for k in ("metrics", "timings", "flags"):
            rest.pop(k)
        if rest["step_losses"] is None:
            rest.pop("step_losses")
        return {**d, **rest}

    @classmethod
    def from_json(cls, d: dict) -> "TrialResult":
        return cls(metrics={k: d.get(k, float("nan")) for k in FINAL_METRICS},
                   timings={k: d.get(k, float("nan")) for k in TIMINGS},
                   flags={k: bool(d.get(k)) for k in FLAGS}, canonical_hash=d.get("canonical_hash", ""),
                   config=d.get("config", {}), pretrain_history=d.get("pretrain_history", []),
                   finetune_history=d.get("finetune_history", []), node_id=d.get("node_id") or "",
                   machine=d.get("machine") or "",
                   probe_encoder=d.get("probe_encoder", ""), step_losses=d.get("step_losses"),
                   warnings=d.get("warnings", []))

    def write(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        return write_json(out / RESULT_FILE, self.to_json(), default=float)

    @classmethod
    def read(cls, out: Path) -> Optional["TrialResult"]:
        p = Path(out) / RESULT_FILE
        return cls.from_json(json.loads(p.read_text())) if p.exists() else None

    def summary(self) -> dict:
        """The final metrics and timings (what ``conmim train`` prints)."""
        return {**self.metrics, **self.timings}


# The row of results.parquet: the trial's identity, its status, then what it measured.
ROW_IDENTITY = ("trial", "variant", "seed", "note", "overrides", "alias_of", "canonical_hash")
ROW_STATUS = ("status", "reason", "node_id", "machine", "probe_encoder")


def result_row(record: dict, status: str, result: Optional[TrialResult] = None, reason: str = "") -> dict:
    """One row of results.parquet for the trial ``record`` (its entry in ``trials.json``)."""
    row: dict[str, Any] = {
        "trial": record["name"], "variant": record["variant"], "seed": record["seed"], "note": record.get("note", ""),
        "overrides": json.dumps(record["overrides"], sort_keys=True, default=str),
        "alias_of": record.get("alias_of") or "", "canonical_hash": record["key"],
        "status": status, "reason": reason, "node_id": result.node_id if result else "",
        "machine": result.machine if result else "",
        "probe_encoder": result.probe_encoder if result else "",
        **{k: float("nan") for k in FINAL_METRICS + TIMINGS}, **{k: False for k in FLAGS}}
    if result is not None:
        row.update(result.metrics, **result.timings, **result.flags)
    return row


def probe_encoder(cfg: ExperimentConfig) -> str:
    """The encoder that is fine-tuned, and probed as ``knn_top1`` / ``linear_probe_top1``."""
    if not cfg.pretrain.enabled:
        return "random init"
    return "momentum" if cfg.finetune.encoder == "momentum" and cfg.objective.target_encoder == "momentum" else "online"


def pretrain_diverged(history: list[dict], chance_loss: float, warmup_epochs: float) -> bool:
    """Pre-training diverged: its loss rose above chance (ln of the dictionary size) in an epoch
    after warm-up, or ended above it or not finite. Such a trial measures an unstable recipe, not
    the component its arm removes. (Warm-up epochs are exempt: the loss starts at about chance.)"""
    if not history:
        return False
    final = history[-1]["pretrain_loss"]
    after = [h["pretrain_loss"] for h in history if h["epoch"] - 1 >= warmup_epochs]
    return bool(not math.isfinite(final) or final > chance_loss or any(x > chance_loss for x in after))


def trial_warnings(flags: dict[str, bool]) -> list[str]:
    """The flags of a trial in words (the ``conmim.warning`` tag of its MLflow run)."""
    said = {"collapsed": "collapsed pre-training", "at_chance": "fine-tuned top-1 at chance",
            "diverged": "pre-training diverged (loss above chance after warm-up)",
            "positional_shortcut": "pre-training task solved by position"}
    return [said[k] for k in FLAGS if flags.get(k) and not (k == "at_chance" and flags.get("collapsed"))]


def make_result(cfg: ExperimentConfig, carry: dict, num_classes: int, wall: float = float("nan")) -> TrialResult:
    pre, probe, ft = carry["pre"], carry["probe"], carry["ft"]
    full = carry.get("ft_full") or {}
    std = pre["final_target_std"] if pre else float("nan")
    measured = {**probe, **ft, **full}
    metrics = {k: measured.get(k, float("nan")) for k in FINAL_METRICS}
    metrics.update(final_pretrain_loss=pre["final_pretrain_loss"] if pre else float("nan"), final_target_std=std)
    flags = {"collapsed": bool(pre is not None and math.isfinite(std) and std < COLLAPSE_STD),
             "at_chance": bool(ft["finetune_top1" if cfg.eval.test_split else "finetune_val_top1"]
                               < 1.0 / num_classes + CHANCE_MARGIN),
             "positional_shortcut": bool(probe.get("positional_shortcut", False)),
             "diverged": bool(pre is not None and pretrain_diverged(pre["history"], math.log(cfg.dictionary_size()),
                                                                    cfg.pretrain.warmup_epochs))}
    timings = {"pretrain_seconds": carry["pretrain_seconds"], "probe_seconds": carry["probe_seconds"],
               "finetune_seconds": ft["finetune_seconds"] + full.get("finetune_full_seconds", 0.0), "wall_seconds": wall}
    return TrialResult(metrics, timings, flags, canonical_hash(cfg), cfg.to_dict(),
                       pre["history"] if pre else [], ft["finetune_history"] + full.get("finetune_full_history", []),
                       probe_encoder=probe_encoder(cfg), step_losses=(pre or {}).get("step_losses") or None,
                       machine=machine(cfg.resources.use_gpu))


def machine(use_gpu: bool = False) -> str:
    """What a trial's numbers depend on besides its config and the commit: the CPU, the float kernels
    torch dispatches to on it (AVX2 and AVX512 kernels of one reduction add in other orders), torch's
    build, and the GPU where one trains. A rerun reproduces a trial to the bit where this matches: the
    study's trial f681ac6a9713 gives validation 73.00 on an AMD EPYC at AVX2, at both 8737915 and
    4d70735, against 73.75 on the host that ran the study at 8737915 (docs/results)."""
    import platform
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [cpu, f"cpu kernels {torch.backends.cpu.get_cpu_capability()}", f"torch {torch.__version__}"]
    if use_gpu and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    return "; ".join(parts)


def _frozen_phases(cfg: ExperimentConfig, session) -> dict:
    """Pre-train (or resume), then probe the frozen encoders and look for a positional shortcut;
    returns the carry of the fine-tuning phases (summaries and timings, no networks)."""
    import torch
    from conmim.data.sources import load_splits
    from conmim.train.build import build_encoder
    from conmim.train.diagnostics import shortcut_diagnostics
    from conmim.train.evaluate import probes
    from conmim.train.pretrain import pretrain

    t0 = time.time()
    pre, net = None, None
    if cfg.pretrain.enabled:
        pre = pretrain(cfg, session)
        net = pre.pop("net")
        encoder = net.encoder(cfg.finetune.encoder)
        state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    else:
        torch.manual_seed(cfg.seed)
        state = build_encoder(cfg).state_dict()  # the 'from scratch' row: a random encoder
    t1 = time.time()
    # Every rank probes: each extracts the features of its share of the images (loader workers as
    # data.num_workers), all-gathers the rest and fits the same probes, so no rank waits in a
    # collective while another works alone (at ImageNet size that wait outlasts any collective
    # timeout). The numbers are the same on every rank and the trial's are rank 0's.
    splits = load_splits(cfg.data)
    frozen = build_encoder(cfg).to(session.device)
    frozen.load_state_dict(state)
    probe = probes(frozen, splits, cfg, session.device, session=session)  # ({} with eval.test_split=false)
    if cfg.eval.probe_online:  # the online encoder too, where it is not the one just probed
        online = net.online.encoder if net is not None and probe_encoder(cfg) == "momentum" else None
        probe.update(probes(online, splits, cfg, session.device, name="online", session=session) if online is not None
                     else {k.replace("_top1", "_online_top1"): v for k, v in probe.items()})
    if net is not None:  # (512 validation images: on every rank alike, cheaper than a gather)
        probe.update(shortcut_diagnostics(net, splits["val"], cfg.model.img_size, session.device))
    del frozen
    # (the encoder's weights travel with the fine-tuning checkpoints only for a second, full-label
    # fine-tune, which needs them after the first; a tiny-scale protocol: the encoder is ~1 MB)
    keep = cfg.eval.full_label_finetune and cfg.finetune.labels_per_class is not None
    return {"pre": pre, "probe": probe, "pretrain_seconds": t1 - t0, "probe_seconds": time.time() - t1,
            "encoder_state": state if keep else None, "_state": state}


def run_phases(cfg: ExperimentConfig, pre_session, ft_session) -> TrialResult:
    """Pre-train (or resume), probe the frozen encoder, fine-tune (or resume); with
    ``eval.full_label_finetune`` and ``finetune.labels_per_class``, a second, full-label fine-tune.

    The summaries of the phases done so far (``carry``) travel in every fine-tuning checkpoint, so
    a run restarted during fine-tuning skips them."""
    from conmim.data.sources import load_splits
    from conmim.train import checkpoint
    from conmim.train.finetune import finetune

    num_classes = load_splits(cfg.data)["train"].num_classes
    full = cfg.eval.full_label_finetune and cfg.finetune.labels_per_class is not None
    done = checkpoint.resumable(cfg, ft_session, "finetune_full") if full else None
    if done is not None:  # restarted in the full-label fine-tune: everything before it is in its carry
        carry = done["extra"]["carry"]
        carry["ft_full"] = finetune(cfg, ft_session, None, carry, phase="finetune_full", all_labels=True)
        return make_result(cfg, carry, num_classes)
    ft_state = checkpoint.resumable(cfg, ft_session, "finetune")
    if ft_state is not None:
        carry, state = ft_state["extra"]["carry"], None
    else:
        carry = _frozen_phases(cfg, pre_session)
        state = carry.pop("_state")
        ft_session.barrier()
    carry["ft"] = finetune(cfg, ft_session, state, carry)
    if full:
        carry["ft_full"] = finetune(cfg, ft_session, carry["encoder_state"], carry, phase="finetune_full",
                                    all_labels=True)
    return make_result(cfg, carry, num_classes)


def run_in_process(cfg: ExperimentConfig, out: str | Path, device: str = "cpu",
                   warnings: Optional[list] = None) -> TrialResult:
    from conmim.train.session import LocalSession, set_threads
    set_threads(cfg.resources.threads)  # as a Ray worker would: the same config, the same numbers
    out = Path(out)
    t0 = time.time()
    result = run_phases(cfg, LocalSession(out, "pretrain", device), LocalSession(out, "finetune", device))
    result.timings["wall_seconds"] = time.time() - t0
    result.warnings = list(warnings or [])
    result.write(out)
    return result
