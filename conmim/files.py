"""Files a run writes for others to read (result.json, sweep.json, trials.json, failed.json),
written atomically: a crash leaves the old file or the new one, never half of one. Torch-free."""
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
