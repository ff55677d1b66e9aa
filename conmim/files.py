"""A trial's result on disk. JSON is written atomically: a crash leaves the old file or the new
one, never half of one. Free of torch, like the Tune trial process that writes ``result.json``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def write_json(path: Path, data: Any, default: Callable[[Any], Any] = str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=default))
    os.replace(tmp, path)
    return path


def write_result(out: Path, result: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    return write_json(out / "result.json", result, default=float)
