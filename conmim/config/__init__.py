"""Configuration: the experiment schema and its canonical form (:mod:`.experiment`), loading with
presets and ``--set`` (:mod:`.loading`), the sweep file and its expansion (:mod:`.sweep`).
Torch-free, so that every command checks its input in a fraction of a second."""
from conmim.config.errors import ConfigError
from conmim.config.experiment import ExperimentConfig
from conmim.config.identity import canonical, canonical_hash
from conmim.config.loading import build, load_config, load_source

__all__ = ["ConfigError", "ExperimentConfig", "build", "canonical", "canonical_hash", "load_config", "load_source"]
