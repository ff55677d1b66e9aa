"""An experiment's identity: its canonical form (every knob that cannot matter set to one fixed
value, so equal experiments get equal configs) and the stable id derived from it, which names a
trial, pairs aliases and lets a resumed sweep find what it already ran."""
from __future__ import annotations

import hashlib
import json

from conmim.config.experiment import (AugmentConfig, DebugConfig, ExperimentConfig, MaskingConfig, ObjectiveConfig,
                                      PretrainConfig)


def canonical(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with every knob that cannot matter set to one fixed value.

    * momentum target: its weights are never optimised, so stop_grad=false is stop_grad=true;
    * shared target: there is no EMA, so momentum is dropped and the online encoder is fine-tuned;
    * no pre-training: every pre-training knob is irrelevant and reset to the defaults;
    * masking disabled: mask type/ratio are irrelevant.
    """
    d = cfg.to_dict()
    obj, default = d["objective"], ObjectiveConfig().model_dump(mode="json")
    if obj["target_encoder"] == "momentum":
        obj["stop_grad"] = True
    else:
        obj["momentum"] = None
        d["finetune"]["encoder"] = "online"
    if not d["masking"]["enabled"]:
        d["masking"] = {**MaskingConfig().model_dump(mode="json"), "enabled": False}
    if not d["pretrain"]["enabled"]:
        d["objective"] = default
        d["masking"] = MaskingConfig().model_dump(mode="json")
        d["augment"] = AugmentConfig().model_dump(mode="json")
        keep = {k: d["pretrain"][k] for k in ("enabled",)}
        d["pretrain"] = {**PretrainConfig().model_dump(mode="json"), **keep}
        d["finetune"]["encoder"] = "online"
    d["debug"] = DebugConfig().model_dump(mode="json") | {k: d["debug"][k] for k in ("crash_at_step", "nan_at_step")}
    return ExperimentConfig.model_validate(d)


# knobs added after ids were in use: left out of the id at their default, so the trials of a sweep
# begun before keep their ids and resume instead of running again
ADDED_LATER = {("pretrain", "attention"): "sdpa", ("eval", "probe_train_per_class"): None}


def canonical_hash(cfg: ExperimentConfig) -> str:
    """Stable id of the experiment a config describes (resources do not change the experiment)."""
    d = canonical(cfg).to_dict()
    d.pop("resources")
    d["data"].pop("cache_dir")  # where the images are cached, not which images
    for (section, key), default in ADDED_LATER.items():
        if d[section][key] == default:
            del d[section][key]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
