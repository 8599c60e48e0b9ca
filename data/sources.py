"""Document sources: local files by glob, the builtin corpus, Hugging Face streams, prepared shards.

A `SourceSpec` is resolved once in the main process (globs expanded, files checked, so a bad path fails
before any worker starts) and opened per stream (rank x loader worker) as a `Source`. A source yields
one epoch of the stream's documents from a cursor, as (cursor_after, document) pairs. A document is a
str (to be tokenised) or an int array (already tokenised). The cursor is a small JSON dict, so a
shuffle block can be re-read on resume without replaying the run.

Sharding rule: the epoch's documents are numbered g = 0, 1, ... in the (seeded) file order, and stream
s of S owns the documents with g % S == s, so every document goes to exactly one stream, for any S.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from data.config import DataConfig
from data.corpus import builtin_files, stdlib_root
from data.errors import DataError

log = logging.getLogger(__name__)

Cursor = dict[str, Any]
Document = str | np.ndarray

TEXT_SUFFIXES = {".txt": "text", ".py": "text", ".md": "text", ".jsonl": "jsonl", ".json": "json"}
ACCEPTED = ".txt .md .py .jsonl .json .parquet (.txt/.md/.py/.jsonl/.json also as .gz or .zst)"
PREPARED_INDEX = "index.json"


class Source(Protocol):
    def documents(self, epoch: int, cursor: Cursor | None) -> Iterator[tuple[Cursor, Document]]:
        """This stream's documents of `epoch`, starting at `cursor` (None: the epoch's start)."""
        ...


class SourceSpec(Protocol):
    name: str

    def open(self, *, stream: int, num_streams: int, seed: int, shuffle: bool) -> Source: ...

    def sample_texts(self, max_chars: int) -> Iterator[str]:
        """A bounded, deterministic sample of the text (for training a tokenizer)."""
        ...


# ----------------------------------------------------------------------------------------------- skips


class SkipLog:
    """Counts records skipped as bad; logs the first of each kind per file and process, so logs stay readable."""

    _logged: set[tuple[str, str]] = set()  # per process: streams re-read blocks and files every epoch

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, kind: str, path: str, record: int) -> None:
        self.counts[kind] += 1
        if (path, kind) not in SkipLog._logged:
            SkipLog._logged.add((path, kind))
            log.log(
                logging.INFO if kind == "empty" else logging.WARNING,  # blank lines are normal in text
                "data: skipped record %d of %s (%s); later ones of this kind are only counted",
                record,
                path,
                kind.replace("_", " "),
            )


# ----------------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class SourceFile:
    path: str
    key: str  # a machine-independent name (relative path): the train/validation split hashes it
    fmt: str  # "text" | "jsonl" | "json" | "parquet"
    compression: str | None  # None | "gz" | "zst"


def in_validation(key: str, record: int, fraction: float) -> bool:
    """Deterministic, machine-independent train/validation split of records."""
    return zlib.crc32(f"{key}#{record}".encode()) % 100_000 < fraction * 100_000


def epoch_order(num_files: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The file order of an epoch: the same in every stream, so the document numbering is global."""
    if not shuffle:
        return np.arange(num_files)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_files)


def describe_file(path: str, key: str) -> SourceFile:
    name = path.lower()
    compression = None
    for suffix, comp in ((".gz", "gz"), (".zst", "zst")):
        if name.endswith(suffix):
            compression, name = comp, name[: -len(suffix)]
    suffix = os.path.splitext(name)[1]
    fmt = "parquet" if suffix == ".parquet" and compression is None else TEXT_SUFFIXES.get(suffix)
    if fmt is None:
        raise DataError(f"data.source: unsupported file type {path!r}; accepted: {ACCEPTED}")
    return SourceFile(path=path, key=key, fmt=fmt, compression=compression)


def resolve_files(pattern: str) -> list[SourceFile]:
    """Expand a glob into the source's files (sorted), with a clear error when nothing usable matches."""
    expanded = os.path.expanduser(pattern)
    paths = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    if not paths:
        what = "does not exist" if not glob.has_magic(expanded) else "matches no files"
        raise DataError(f"data.source: {pattern!r} {what}")
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    files = [describe_file(p, os.path.relpath(os.path.abspath(p), root)) for p in paths]
    if all(os.path.getsize(f.path) == 0 for f in files):
        raise DataError(f"data.source: every file matching {pattern!r} is empty ({len(files)} files)")
    return files


def _open_binary(f: SourceFile):
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


class FileSource:
    """Documents from local files; every stream reads the files but decodes only the records it owns."""

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
    ) -> None:
        self.files, self.split, self.held_out, self.unit = files, split, held_out, unit
        self.field, self.max_bytes = cfg.text_field, cfg.max_record_bytes
        self.stream, self.num_streams, self.seed, self.shuffle = stream, num_streams, seed, shuffle
        self.skips = SkipLog()

    def _wanted(self, f: SourceFile, record: int) -> bool:
        if self.held_out is None:
            return True
        return in_validation(f.key, record, self.held_out) == (self.split == "validation")

    def documents(self, epoch: int, cursor: Cursor | None) -> Iterator[tuple[Cursor, Document]]:
        order = epoch_order(len(self.files), seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        c = cursor or {"file": 0, "pos": 0, "rec": 0, "g": 0}
        pos, rec, g = c["pos"], c["rec"], c["g"]
        for fi in range(c["file"], len(order)):
            f = self.files[order[fi]]
            try:
                if os.path.getsize(f.path) == 0:
                    if pos == 0 and g % self.num_streams == self.stream:
                        self.skips.add("empty_file", f.path, 0)
                    continue
                for after, raw in _raw_records(f, self.unit, self.field, pos, rec):
                    record, rec = rec, rec + 1
                    if not self._wanted(f, record):
                        continue
                    g += 1
                    if (g - 1) % self.num_streams != self.stream:
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
        )

    def sample_texts(self, max_chars: int) -> Iterator[str]:
        source = self.open(stream=0, num_streams=1, seed=0, shuffle=True)
        yield from _bounded(source, self.name, max_chars)


def _bounded(source: Source, name: str, max_chars: int) -> Iterator[str]:
    total = 0
    for _, text in source.documents(0, None):
        yield text
        total += len(text)
        if total >= max_chars:
            return
    if total == 0:
        skips = getattr(source, "skips", SkipLog()).counts
        detail = (
            f" ({', '.join(f'{k}: {v}' for k, v in sorted(skips.items()))} records skipped)" if skips else ""
        )
        raise DataError(f"data.source: {name!r} has no usable text{detail}")


# -------------------------------------------------------------------------------------- Hugging Face


class HFSource:
    """A streamed Hugging Face dataset; `split_dataset_by_node` shards it, its own state is the cursor."""

    def __init__(self, spec: HFSpec, *, stream: int, num_streams: int, seed: int, shuffle: bool) -> None:
        self.spec, self.stream, self.num_streams = spec, stream, num_streams
        self.seed, self.shuffle = seed, shuffle
        self.skips = SkipLog()

    def documents(self, epoch: int, cursor: Cursor | None) -> Iterator[tuple[Cursor, Document]]:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(self.spec.load(), rank=self.stream, world_size=self.num_streams)
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed, buffer_size=1)  # shard order only: we own the shuffle buffer
            ds.set_epoch(epoch)
        if cursor is not None:
            ds.load_state_dict(cursor["hf"])
        index = cursor["n"] if cursor else 0
        for example in ds:
            index += 1
            text = example.get(self.spec.field)
            if not isinstance(text, str) or not text.strip():
                self.skips.add("missing_field" if text is None else "empty", self.spec.name, index - 1)
                continue
            yield {"hf": ds.state_dict(), "n": index}, text


@dataclass(frozen=True)
class HFSpec:
    name: str  # as written in the config: hf:NAME[:CONFIG]
    dataset: str
    config: str | None
    split: str
    field: str

    def load(self):
        import datasets

        try:
            return datasets.load_dataset(self.dataset, self.config, split=self.split, streaming=True)
        except Exception as exc:  # the hub and loaders raise many types; one clear line is what helps
            raise DataError(
                f"data.source: cannot load {self.name!r} split {self.split!r}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None

    def open(self, *, stream: int, num_streams: int, seed: int, shuffle: bool) -> HFSource:
        return HFSource(self, stream=stream, num_streams=num_streams, seed=seed, shuffle=shuffle)

    def sample_texts(self, max_chars: int) -> Iterator[str]:
        yield from _bounded(self.open(stream=0, num_streams=1, seed=0, shuffle=False), self.name, max_chars)


# ------------------------------------------------------------------------------------ prepared shards


class PreparedSource:
    """Token shards written by `data.prepare`: random access, so a stream jumps straight to its documents."""

    def __init__(
        self, spec: PreparedSpec, *, stream: int, num_streams: int, seed: int, shuffle: bool
    ) -> None:
        self.spec, self.stream, self.num_streams = spec, stream, num_streams
        self.seed, self.shuffle = seed, shuffle
        split = spec.index["splits"][spec.split]
        self.file_docs = np.array([f["docs"] for f in split["files"]], dtype=np.int64)
        self.file_start = np.concatenate([[0], np.cumsum(self.file_docs)])
        dtype = np.dtype(spec.index["dtype"])
        self.shards, starts = [], [0]
        for shard in split["shards"]:
            base = Path(spec.path, shard["name"])
            tokens = (
                np.memmap(f"{base}.bin", dtype=dtype, mode="r") if shard["tokens"] else np.zeros(0, dtype)
            )
            offsets = np.load(f"{base}.idx.npy", mmap_mode="r")
            self.shards.append((tokens, offsets))
            starts.append(starts[-1] + shard["docs"])
        self.shard_start = np.array(starts, dtype=np.int64)

    def tokens(self, doc: int) -> np.ndarray:
        shard = int(np.searchsorted(self.shard_start, doc, side="right")) - 1
        tokens, offsets = self.shards[shard]
        local = doc - self.shard_start[shard]
        return np.asarray(tokens[offsets[local] : offsets[local + 1]], dtype=np.int64)

    def documents(self, epoch: int, cursor: Cursor | None) -> Iterator[tuple[Cursor, Document]]:
        order = epoch_order(len(self.file_docs), seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        epoch_start = np.concatenate([[0], np.cumsum(self.file_docs[order])])
        c = cursor or {"file": 0, "g": 0}
        S, s = self.num_streams, self.stream
        for fi in range(c["file"], len(order)):
            g0, g1 = int(epoch_start[fi]), int(epoch_start[fi + 1])
            start = max(c["g"], g0)
            first = start + (s - start) % S
            for g in range(first, g1, S):
                yield {"file": fi, "g": g + 1}, self.tokens(int(self.file_start[order[fi]]) + g - g0)


@dataclass(frozen=True)
class PreparedSpec:
    name: str
    path: str
    split: str
    index: dict[str, Any]

    def open(self, *, stream: int, num_streams: int, seed: int, shuffle: bool) -> PreparedSource:
        return PreparedSource(self, stream=stream, num_streams=num_streams, seed=seed, shuffle=shuffle)

    def sample_texts(self, max_chars: int) -> Iterator[str]:
        raise DataError(
            f"data.source: {self.name!r} is already tokenised; its tokenizer is in "
            f"{os.path.join(self.path, 'tokenizer')} (leave data.tokenizer unset to use it)"
        )


def load_prepared_index(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, PREPARED_INDEX)) as fh:
            index = json.load(fh)
        assert index["format"] == "pretrain-token-shards" and index["splits"]
    except (OSError, ValueError, KeyError, AssertionError):
        raise DataError(
            f"data.source: {path!r} has no valid {PREPARED_INDEX} (write one with `pretrain data prepare`)"
        ) from None
    return index


# ---------------------------------------------------------------------------------------- resolving


def resolve_source(spec: str, cfg: DataConfig, split: str, *, held_out: bool) -> SourceSpec:
    """Turn a `data.source` string into a spec for `split`.

    held_out: the validation split is carved out of this source (validation_fraction of its records),
    rather than being a separate source.
    """
    fraction = cfg.validation_fraction if held_out else None
    if spec == "builtin":
        root = stdlib_root()
        files = [
            SourceFile(path=str(p), key=p.relative_to(root).as_posix(), fmt="text", compression=None)
            for p in builtin_files()
        ]
        return FilesSpec(name=spec, files=files, cfg=cfg, split=split, held_out=fraction, unit="file")
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise DataError(f"data.source: {spec!r} names no dataset; write hf:NAME or hf:NAME:CONFIG")
        hf_split = cfg.hf_split if split == "train" else "validation"
        return HFSpec(name=spec, dataset=name, config=config or None, split=hf_split, field=cfg.text_field)
    if os.path.isdir(os.path.expanduser(spec)) and os.path.exists(
        os.path.join(os.path.expanduser(spec), PREPARED_INDEX)
    ):
        path = os.path.expanduser(spec)
        index = load_prepared_index(path)
        if split not in index["splits"]:
            raise DataError(f"data.source: prepared {path!r} has no {split!r} split")
        return PreparedSpec(name=spec, path=path, split=split, index=index)
    if os.path.isdir(os.path.expanduser(spec)):
        raise DataError(
            f"data.source: {spec!r} is a directory without {PREPARED_INDEX}; "
            "give a glob such as 'DIR/*.jsonl' or a directory from `pretrain data prepare`"
        )
    return FilesSpec(
        name=spec, files=resolve_files(spec), cfg=cfg, split=split, held_out=fraction, unit=cfg.text_unit
    )
