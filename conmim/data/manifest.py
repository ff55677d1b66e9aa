"""``_manifest.json``: what a folder of Parquet shards claims to hold, and the check that it does.

``cluster/imagenet_parquet.py shards`` writes the manifest twice: first with ``"complete": false``
and the planned shards (name -> rows), then, once every shard is written, with ``"complete":
true`` and each shard's size in bytes. It also stamps its settings (images per shard, resize,
JPEG quality) into every shard's Parquet metadata (``conmim.shard``). Reading the shards then
refuses, naming what is wrong,

* an unfinished conversion (``complete`` false: training would see a subset of the classes);
* a missing shard, or a shard the manifest does not list (left from another conversion);
* a shard whose size, rows or settings differ from the manifest's (stale: another run wrote it);
* split counts or labels that do not add up to the manifest's.

:func:`check_manifest` is the cheap part (the listing and the sizes, no shard opened), for a
pre-flight; the data source checks each shard's rows and settings as it reads it
(:func:`check_shard`) and the totals at the end (:func:`check_totals`). A folder without a
manifest (shards written by hand) is read as it is. Free of torch, so a config check stays fast.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from conmim.config.errors import ConfigError

MANIFEST = "_manifest.json"
SHARD_METADATA = b"conmim.shard"  # a shard's settings (JSON), in its Parquet schema metadata
RERUN = ("write the shards again into an empty folder (cluster/imagenet_parquet.py shards ROOT OUT), "
         "or point data.root at a complete set")


def _filesystem(root: str):
    import pyarrow.fs as pafs
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), str(Path(root).resolve())


def read_manifest(root: str) -> Optional[dict]:
    """The manifest of the shard folder ``root`` (local path or URI), or None when ``root`` is a
    single file or a folder without one."""
    import pyarrow.fs as pafs
    fs, path = _filesystem(str(root))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    where = f"{path.rstrip('/')}/{MANIFEST}"
    if fs.get_file_info(where).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(where) as f:
        text = f.read().decode()
    try:
        manifest = json.loads(text)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ConfigError(f"data.root: '{root}' has an unreadable {MANIFEST} ({e}); {RERUN}.") from None
    return manifest


def shard_settings(manifest: dict) -> dict:
    """The conversion's settings (older manifests kept two of them at the top level)."""
    if "settings" in manifest:
        return manifest["settings"]
    return {k: manifest[k] for k in ("images_per_shard", "resize_shorter") if k in manifest}


def _first(names, n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_manifest(root: str, found: Optional[dict[str, int]] = None) -> Optional[dict]:
    """Raise :class:`ConfigError` naming what is wrong when the shards of ``root`` are not the
    complete set its manifest describes; returns the manifest (None when there is none).
    ``found``: {shard name relative to root: size in bytes}, when the caller listed them already."""
    manifest = read_manifest(root)
    if manifest is None:
        return None
    where = f"data.root: the Parquet shards of '{root}'"
    planned = manifest.get("files")
    if manifest.get("complete") is False:
        raise ConfigError(f"{where} are an unfinished conversion: {MANIFEST} says it is not complete "
                          f"({len(planned or {})} shards planned); training would see a subset. Run the "
                          f"converter again with the same settings to finish it.")
    if found is None:
        found = list_shards(root)
    if planned is None:  # a manifest of before the per-shard record: the count is all it says
        if len(found) != manifest.get("shards"):
            raise ConfigError(f"{where} are {len(found)} files, but {MANIFEST} says {manifest.get('shards')} "
                              f"shards: a partial or mixed set; {RERUN}.")
        return manifest
    missing, extra = set(planned) - set(found), set(found) - set(planned)
    if missing:
        raise ConfigError(f"{where} are incomplete: {len(missing)} of the {len(planned)} shards {MANIFEST} lists "
                          f"are missing ({_first(missing)}); {RERUN}.")
    if extra:
        raise ConfigError(f"{where} include {len(extra)} shards {MANIFEST} does not list ({_first(extra)}), "
                          f"left from another conversion; {RERUN}.")
    resized = {n for n, rec in planned.items() if rec.get("bytes") is not None and rec["bytes"] != found[n]}
    if resized:
        n = sorted(resized)[0]
        raise ConfigError(f"{where} are stale: {len(resized)} shards differ in size from {MANIFEST} ({n}: "
                          f"{found[n]} bytes, the manifest says {planned[n]['bytes']}), so another run wrote "
                          f"them; {RERUN}.")
    return manifest


def list_shards(root: str) -> dict[str, int]:
    """{name relative to root: bytes} of the .parquet files of the folder ``root`` (hidden and
    ``_``-prefixed names skipped, as the data source skips them)."""
    import pyarrow.fs as pafs
    fs, path = _filesystem(str(root))
    base = path.rstrip("/") + "/"
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        rel = info.path[len(base):]
        if (info.type == pafs.FileType.File and rel.endswith(".parquet")
                and not any(part.startswith((".", "_")) for part in rel.split("/"))):
            out[rel] = info.size
    return out


def check_shard(root: str, manifest: dict, name: str, rows: int, metadata: Optional[dict]) -> None:
    """Refuse a shard whose rows or stamped settings are not the manifest's."""
    where = f"data.root: shard '{name}' of '{root}'"
    planned = (manifest.get("files") or {}).get(name)
    if planned is not None and planned.get("rows") != rows:
        raise ConfigError(f"{where} holds {rows} images, {MANIFEST} says {planned.get('rows')}: a stale shard; {RERUN}.")
    stamped = (metadata or {}).get(SHARD_METADATA)
    if stamped is not None:
        got, want = json.loads(stamped), shard_settings(manifest)
        differ = {k: (got.get(k), want[k]) for k in want if got.get(k) != want[k]}
        if differ:
            what = ", ".join(f"{k}={a} (manifest: {b})" for k, (a, b) in sorted(differ.items()))
            raise ConfigError(f"{where} was written with other settings: {what}; {RERUN}.")


def check_totals(root: str, manifest: dict, counts: dict[str, int], max_label: int) -> int:
    """Refuse split counts or labels that are not the manifest's; returns its number of classes
    (the class count of the set, not the largest label seen + 1)."""
    want = manifest.get("images") or {}
    for split, n in want.items():
        if counts.get(split, 0) != n:
            raise ConfigError(f"data.root: the Parquet shards of '{root}' hold {counts.get(split, 0)} {split} images, "
                              f"{MANIFEST} says {n}: a partial or mixed set; {RERUN}.")
    classes = manifest.get("classes")
    if classes is None:
        return max_label + 1
    if max_label >= classes:
        raise ConfigError(f"data.root: the Parquet shards of '{root}' have label {max_label}, but {MANIFEST} says "
                          f"{classes} classes (labels 0..{classes - 1}); {RERUN}.")
    return int(classes)


def manifest_problem(root: str) -> Optional[str]:
    """:func:`check_manifest` as a message (None when the set is complete or has no manifest)."""
    try:
        check_manifest(root)
    except ConfigError as e:
        return str(e)
    return None
