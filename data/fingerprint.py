"""What data a run read, recorded with each checkpoint, so a resume notices when the data changed under it.

A saved position (file index in the epoch's order, byte offset, record number) only means the same
thing if the files are the same: an added, removed or rewritten file silently shifts every stream to
other documents. `data_fingerprint(cfg)` records, per source: local files as (relative path, size,
modification time) (the builtin corpus without times: they differ between installs of the same
Python); a prepared directory as the hash of its `index.json` (which lists its shards, documents per
source file and tokenizer or decoding settings); an `hf:` dataset as its name, config and split. `check_fingerprint` answers
a change with a one-line DataError naming the first changed file, or, with `data.allow_changed=true`,
a warning to print.

With `data.allow_changed=true` the saved positions are kept as they are: each virtual stream resumes in
the same epoch, at the same place in that epoch's file order, at the same byte offset or record number.
If files were added or removed, the epoch's order and each stream's share of files change, so the rest of
the current epoch may repeat or skip documents (a record cut by a byte offset is skipped and counted as
bad); later epochs use the new files as a fresh run would. Cheap (a stat per file, no reading, no torch).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from data.config import DataConfig, Modality
from data.errors import DataError
from data.files import FilesSpec
from data.hub import HFSpec
from data.shards import PREPARED_INDEX, PreparedSpec
from data.sources import resolve_any_source, source_settings

FINGERPRINT_VERSION = 1
Fingerprint = dict[str, Any]


def data_fingerprint(cfg: DataConfig, modality: Modality | None = None) -> Fingerprint:
    """What `cfg`'s train and validation sources (text, or `modality`'s) are now (JSON-serialisable)."""
    sources = {
        setting: _source(resolve_any_source(source, cfg, split, held_out=held_out, modality=modality))
        for setting, source, split, held_out in source_settings(cfg)
    }
    return {"version": FINGERPRINT_VERSION, "sources": sources}


def _source(spec: Any) -> dict[str, Any]:
    from data.media import BuiltinSpec, HFMediaSpec, MediaFilesSpec, PreparedMediaSpec

    if isinstance(spec, BuiltinSpec):  # generated: its size is all there is to it
        return {"kind": "files", "name": spec.name, "files": [["generated", spec.size, None]]}
    if isinstance(spec, MediaFilesSpec):
        files = [[f.key, *_size_and_time(f.path)] for f in spec.files]
        return {"kind": "files", "name": spec.name, "files": files}
    if isinstance(spec, HFMediaSpec):
        return {"kind": "hf", "name": spec.name, "dataset": spec.dataset, "config": spec.config}
    if isinstance(spec, FilesSpec):
        timed = spec.name != "builtin"
        files = []
        for f in spec.files:
            st = os.stat(f.path)
            files.append([f.key, st.st_size, st.st_mtime_ns if timed else None])
        return {"kind": "files", "name": spec.name, "files": files}
    if isinstance(spec, PreparedSpec | PreparedMediaSpec):
        with open(os.path.join(spec.path, PREPARED_INDEX), "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        return {"kind": "prepared", "name": spec.name, "index_sha256": digest}
    if isinstance(spec, HFSpec):
        return {"kind": "hf", "name": spec.name, "dataset": spec.dataset, "config": spec.config}
    raise TypeError(f"no fingerprint for {type(spec).__name__}")


def first_change(saved: Fingerprint, current: Fingerprint) -> str | None:
    """The first difference between two fingerprints, in words; None when the data is the same."""
    if saved.get("version") != FINGERPRINT_VERSION:
        return f"the checkpoint's data fingerprint has version {saved.get('version')!r}"
    old, new = saved["sources"], current["sources"]
    for setting in sorted(set(old) | set(new)):
        a, b = old.get(setting), new.get(setting)
        if a is None or b is None:
            return f"{setting} was {_what(a)}, is {_what(b)}"
        if a["kind"] != b["kind"] or a["name"] != b["name"]:
            return f"{setting} was {_what(a)}, is {_what(b)}"
        if a["kind"] == "prepared" and a["index_sha256"] != b["index_sha256"]:
            return f"{setting}: the prepared shards' {PREPARED_INDEX} in {a['name']!r} changed"
        if a["kind"] == "hf" and a != b:
            return f"{setting}: {_what(a)} is now {_what(b)}"
        if a["kind"] == "files":
            change = _first_file_change(a["files"], b["files"])
            if change:
                return f"{setting} {a['name']!r}: {change}"
    return None


def _first_file_change(old: list[list[Any]], new: list[list[Any]]) -> str | None:
    before, after = {f[0]: f for f in old}, {f[0]: f for f in new}
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if b is None:
            return f"file {key!r} is gone"
        if a is None:
            return f"file {key!r} is new"
        if a[1] != b[1]:
            return f"file {key!r} changed size ({a[1]} -> {b[1]} bytes)"
        if a[2] != b[2]:
            return f"file {key!r} was modified (same size, another modification time)"
    return None


def _what(source: dict[str, Any] | None) -> str:
    if source is None:
        return "not set"
    return f"{source['kind']} {source['name']!r}"


def _size_and_time(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def check_fingerprint(saved: Fingerprint, cfg: DataConfig, modality: Modality | None = None) -> str | None:
    """Compare the checkpoint's fingerprint with the data `cfg` names now.

    Unchanged: None. Changed: a one-line DataError naming the first change, or, with
    `data.allow_changed=true`, the warning line to print (positions are kept as they are; see above).
    """
    change = first_change(saved, data_fingerprint(cfg, modality))
    if change is None:
        return None
    if not cfg.allow_changed:
        raise DataError(
            f"the data changed since the checkpoint: {change}; restore it, start a new run.dir, or set "
            "data.allow_changed=true to resume anyway at the saved positions"
        )
    return (
        f"warning: the data changed since the checkpoint ({change}); resuming anyway "
        "(data.allow_changed=true): saved positions are kept, the rest of the current epoch may repeat or "
        "skip documents"
    )
