"""Credentials never reach MLflow: config values, URIs and tags are masked where a key or a
value looks secret (including the values of secret-looking environment variables)."""
from __future__ import annotations

import os
import re
from typing import Any

SECRET_KEY = re.compile(r"(passw(or)?d|secret|token|api_?key|access_?key|private_?key|credential|auth|session_?key|"
                        r"signature|(^|[._-])sig($|[._-])|(^|[._-])key$)", re.I)
MASK = "***"


def redact_uri(uri: str) -> str:
    """``scheme://user:password@host/...?token=...`` -> ``scheme://user:***@host/...?token=***``."""
    uri = re.sub(r"(//[^/@:\s]+):([^/@\s]+)@", rf"\1:{MASK}@", uri)      # user:password@
    uri = re.sub(r"//([^/@:\s]{16,})@", rf"//{MASK}@", uri)                # a bare token as user name
    return re.sub(r"([?&;][^=&;#\s]+)=([^&;#\s]*)",
                  lambda m: f"{m.group(1)}={MASK}" if SECRET_KEY.search(m.group(1).lstrip("?&;")) else m.group(0), uri)


def _secret_env_values() -> list[str]:
    """Values of environment variables whose names look secret (MLFLOW_TRACKING_TOKEN, AWS_SECRET_ACCESS_KEY,
    MLFLOW_TRACKING_PASSWORD, ...): a config value that contains one is masked."""
    return sorted((v for k, v in environ_copy().items() if SECRET_KEY.search(k) and len(v) >= 6), key=len, reverse=True)


def environ_copy() -> dict[str, str]:
    """A copy of os.environ. MLflow's telemetry thread sets and unsets a variable of its own
    (_MLFLOW_TELEMETRY_SESSION_ID) at any time; ``dict(os.environ)`` reads each listed name
    again and raised KeyError for one that vanished meanwhile, failing whole trials. Listing the
    names is atomic, and ``get`` skips a name that is gone."""
    return {k: v for k in list(os.environ) if (v := os.environ.get(k)) is not None}


def redact_text(s: str) -> str:
    for secret in _secret_env_values():
        s = s.replace(secret, MASK)
    return redact_uri(s) if "://" in s or "?" in s else s


def redact_value(key: str, value: Any) -> Any:
    """One config value as it may be shown to MLflow: masked when its key or content looks secret."""
    if isinstance(value, dict):
        return {k: redact_value(f"{key}.{k}" if key else k, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(key, v) for v in value]
    if key and SECRET_KEY.search(key.rsplit(".", 1)[-1]) and value not in (None, "", False):
        return MASK
    return redact_text(value) if isinstance(value, str) else value


def redact_params(flat: dict[str, Any]) -> dict[str, str]:
    """Config values as MLflow params; anything that looks like a credential is masked."""
    out = {}
    for k, v in flat.items():
        v = redact_value(k, v)
        s = "" if v is None else str(v)
        out[k] = redact_text(s)[:6000]
    return out


def redact_tags(tags: dict[str, str]) -> dict[str, str]:
    return {k: (MASK if SECRET_KEY.search(k.rsplit(".", 1)[-1]) else redact_text(str(v))) for k, v in tags.items()}
