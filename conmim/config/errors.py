"""The one error type of bad input, and the base of every config schema."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration the user must fix; the message is meant to be shown as is (the CLI turns
    it into exit code 2)."""


class Strict(BaseModel):
    """Unknown keys, NaN/inf and wrong types are refused, also on assignment."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
