"""Tracking URIs as the config gives them: a SQLite store's file, and a relative one made absolute."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def sqlite_file(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` tracking URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative SQLite path made absolute (against the working directory): the
    store stays the same one when Ray workers or ``conmim ui`` run from other folders."""
    db = sqlite_file(uri)
    if db is None or db.is_absolute() or str(db).startswith(":memory:"):
        return uri
    return f"sqlite:///{db.resolve()}"
