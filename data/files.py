"""Local files: .txt/.md/.py, .jsonl/.json, .parquet, plain or .gz/.zst; the builtin corpus is files too.

With at least as many files as streams, each train stream opens only its own files (file-level sharding: the
files at positions s, s + S, s + 2S ... of the epoch's order), so it reads ~1/S of the bytes; with fewer,
every stream reads the files in the epoch's order but decodes only the records it owns (g % S == s).
Cursors are byte offsets in plain files (seek) and record numbers in compressed and parquet files (row
groups skipped), so re-reading a shuffle block costs at most one file's decompression, never a replay.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from data.config import DataConfig
from data.errors import DataError
from data.records import Cursor, Document, SkipLog, bounded_sample, epoch_order

TEXT_SUFFIXES = {".txt": "text", ".py": "text", ".md": "text", ".jsonl": "jsonl", ".json": "json"}
ACCEPTED = ".txt .md .py .jsonl .json .parquet (.txt/.md/.py/.jsonl/.json also as .gz or .zst)"


@dataclass(frozen=True)
class SourceFile:
    path: str
    key: str  # a machine-independent name (relative path): the train/validation split hashes it
    fmt: str  # "text" | "jsonl" | "json" | "parquet"
    compression: str | None  # None | "gz" | "zst"


def in_validation(key: str, record: int, fraction: float) -> bool:
    """Deterministic, machine-independent train/validation split of records."""
    return zlib.crc32(f"{key}#{record}".encode()) % 100_000 < fraction * 100_000


def describe_file(path: str, key: str, *, setting: str = "data.source") -> SourceFile:
    name = path.lower()
    compression = None
    for suffix, comp in ((".gz", "gz"), (".zst", "zst")):
        if name.endswith(suffix):
            compression, name = comp, name[: -len(suffix)]
    suffix = os.path.splitext(name)[1]
    fmt = "parquet" if suffix == ".parquet" and compression is None else TEXT_SUFFIXES.get(suffix)
    if fmt is None:
        raise DataError(f"{setting}: unsupported file type {path!r}; accepted: {ACCEPTED}")
    return SourceFile(path=path, key=key, fmt=fmt, compression=compression)


def resolve_files(pattern: str, *, setting: str = "data.source") -> list[SourceFile]:
    """Expand a glob into the source's files (sorted), with a clear error when nothing usable matches."""
    expanded = os.path.expanduser(pattern)
    paths = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    if not paths:
        what = "does not exist" if not glob.has_magic(expanded) else "matches no files"
        raise DataError(f"{setting}: {pattern!r} {what}")
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    files = [describe_file(p, os.path.relpath(os.path.abspath(p), root), setting=setting) for p in paths]
    if all(os.path.getsize(f.path) == 0 for f in files):
        raise DataError(f"{setting}: every file matching {pattern!r} is empty ({len(files)} files)")
    return files


def _open_binary(f: SourceFile) -> BinaryIO:
    if f.compression == "gz":
        return gzip.open(f.path, "rb")
    if f.compression == "zst":
        import zstandard

        return io.BufferedReader(zstandard.open(f.path, "rb"))  # adds line iteration
    return open(f.path, "rb")  # noqa: SIM115 (closed by the caller's `with`)


def _lines(fh, pos: int) -> Iterator[tuple[int, bytes]]:
    for line in fh:
        pos += len(line)
        yield pos, line


def _paragraphs(fh, pos: int) -> Iterator[tuple[int, bytes]]:
    """Records separated by blank lines (the usual layout of plain-text corpora)."""
    block: list[bytes] = []
    after = pos
    for after, line in _lines(fh, pos):
        if line.strip():
            block.append(line)
        elif block:
            yield after, b"".join(block)
            block = []
    if block:
        yield after, b"".join(block)


def _raw_records(f: SourceFile, unit: str, field: str, pos: int, rec: int) -> Iterator[tuple[int, Any]]:
    """(position_after, raw record) from (pos, rec): a byte offset for plain files, a record count otherwise."""
    if f.fmt == "parquet":
        yield from _parquet_records(f, field, rec)
        return
    if f.fmt == "json" and _is_json_array(f):
        with _open_binary(f) as fh:
            items = json.load(fh)
        for i in range(rec, len(items)):
            yield i + 1, items[i]
        return
    with _open_binary(f) as fh:
        seekable = f.compression is None
        if seekable:
            fh.seek(pos)
        if f.fmt == "text" and unit == "file":
            if rec == 0:
                yield 1, fh.read()
            return
        records = _paragraphs(fh, pos) if f.fmt == "text" and unit == "paragraph" else _lines(fh, pos)
        for i, (after, raw) in enumerate(records):
            if seekable or i >= rec:
                yield (after if seekable else i + 1), raw.rstrip(b"\r\n")


def _is_json_array(f: SourceFile) -> bool:
    """A .json file is either JSON Lines or one array of records."""
    with _open_binary(f) as fh:
        return fh.read(256).lstrip()[:1] == b"["


def _parquet_records(f: SourceFile, field: str, rec: int) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f.path)
    if field not in pf.schema_arrow.names:
        raise DataError(
            f"{f.path}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
            "set data.text_field"
        )
    start = 0
    for group in range(pf.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        if start + rows > rec:
            texts = pf.read_row_group(group, columns=[field]).column(0).to_pylist()
            for i in range(max(rec - start, 0), rows):
                yield start + i + 1, texts[i]
        start += rows


def parse_record(raw: Any, f: SourceFile, field: str, max_bytes: int) -> tuple[str | None, str]:
    """The record's text, or None and the kind of skip."""
    if isinstance(raw, bytes | str) and len(raw) > max_bytes:
        return None, "too_long"
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_utf8"
        if f.fmt in ("jsonl", "json"):
            try:
                raw = json.loads(raw)
            except ValueError:
                return None, "bad_json"
    if f.fmt != "text":
        if isinstance(raw, dict):
            raw = raw.get(field)
        elif f.fmt != "parquet":
            return None, "missing_field"
        if raw is None:
            return None, "missing_field"
    if not isinstance(raw, str):
        return None, "not_text"
    if not raw.strip():
        return None, "empty"
    return raw, ""


def shard_by_file(num_files: int, num_streams: int, split: str) -> bool:
    """Whether each stream owns whole files (every stream gets at least one) rather than every S-th record.

    Train only: validation is one pass over a small share of the records, and whole files could leave a
    rank without any (every rank must evaluate), so it keeps the balanced record-level split."""
    return split == "train" and num_files >= num_streams


class FileSource:
    """Documents from local files: a stream's own files (by_file), or its own records of every file."""

    def __init__(
        self,
        files: list[SourceFile],
        cfg: DataConfig,
        *,
        split: str,
        held_out: float | None,
        stream: int,
        num_streams: int,
        seed: int,
        shuffle: bool,
        unit: str,
        by_file: bool,
    ) -> None:
        self.files, self.split, self.held_out, self.unit = files, split, held_out, unit
        self.field, self.max_bytes = cfg.text_field, cfg.max_record_bytes
        self.stream, self.num_streams, self.seed, self.shuffle = stream, num_streams, seed, shuffle
        self.by_file = by_file
        # a stream's own files change from epoch to epoch (so one epoch of them may hold no train record)
        self.epochs_differ = by_file and shuffle and num_streams > 1
        self.skips = SkipLog()

    def _wanted(self, f: SourceFile, record: int) -> bool:
        if self.held_out is None:
            return True
        return in_validation(f.key, record, self.held_out) == (self.split == "validation")

    def documents(self, epoch: int, cursor: Cursor | None) -> Iterator[tuple[Cursor, Document]]:
        order = epoch_order(len(self.files), seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        S, s = self.num_streams, self.stream
        first, step = (s, S) if self.by_file else (0, 1)
        c = cursor or {"file": first, "pos": 0, "rec": 0, "g": 0}
        pos, rec, g = c["pos"], c["rec"], c["g"]
        for fi in range(c["file"], len(order), step):
            f = self.files[order[fi]]
            try:
                if os.path.getsize(f.path) == 0:
                    if pos == 0 and (self.by_file or g % S == s):
                        self.skips.add("empty_file", f.path, 0)
                    continue
                for after, raw in _raw_records(f, self.unit, self.field, pos, rec):
                    record, rec = rec, rec + 1
                    if not self._wanted(f, record):
                        continue
                    g += 1
                    if not self.by_file and (g - 1) % S != s:
                        continue
                    text, kind = parse_record(raw, f, self.field, self.max_bytes)
                    if text is None:
                        self.skips.add(kind, f.path, record)
                        continue
                    yield {"file": fi, "pos": after, "rec": rec, "g": g}, text
            except (OSError, EOFError, ValueError, zlib.error) as exc:  # corrupt archive, unreadable file
                if isinstance(exc, DataError):
                    raise
                raise DataError(f"cannot read {f.path}: {exc}") from None
            pos, rec = 0, 0


@dataclass(frozen=True)
class FilesSpec:
    name: str
    files: list[SourceFile]
    cfg: DataConfig
    split: str
    held_out: float | None  # share of the records split off for validation; None: all are this split's
    unit: str

    def open(self, *, stream: int, num_streams: int, seed: int, shuffle: bool) -> FileSource:
        return FileSource(
            self.files,
            self.cfg,
            split=self.split,
            held_out=self.held_out,
            stream=stream,
            num_streams=num_streams,
            seed=seed,
            shuffle=shuffle,
            unit=self.unit,
            by_file=shard_by_file(len(self.files), num_streams, self.split),
        )

    def sample_texts(self, max_chars: int) -> Iterator[str]:
        source = self.open(stream=0, num_streams=1, seed=0, shuffle=True)
        yield from bounded_sample(source, self.name, max_chars)


def check_first_record(spec: FilesSpec, setting: str) -> None:
    """The first record of each file of `spec` parses with the configured format and field: a wrong
    `data.text_field` or a binary file fails here, in the check, instead of as skipped records in training."""
    for f in spec.files:
        if os.path.getsize(f.path) == 0:
            continue
        try:
            first = next(iter(_raw_records(f, spec.unit, spec.cfg.text_field, 0, 0)), None)
        except (OSError, EOFError, ValueError, zlib.error) as exc:
            if isinstance(exc, DataError):
                raise DataError(f"{setting}: {exc}") from None
            raise DataError(f"{setting}: cannot read {f.path}: {exc}") from None
        if first is None:
            continue
        text, kind = parse_record(first[1], f, spec.cfg.text_field, spec.cfg.max_record_bytes)
        if text is None and kind != "empty":
            what = kind.replace("_", " ")
            if kind == "missing_field":
                what = f"no field {spec.cfg.text_field!r} (set data.text_field)"
            raise DataError(f"{setting}: the first record of {f.path} is unreadable: {what}")
