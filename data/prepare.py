"""`pretrain data prepare`: tokenise a source once into memory-mapped binary token shards.

Layout of OUT_DIR: `{split}-{n:05d}.bin` (the documents' tokens back to back, uint16 or uint32),
`{split}-{n:05d}.idx.npy` (int64 document offsets, one more than documents), `tokenizer/`, and
`index.json` (written last, so a half-written directory is never read). The index keeps how many
documents each source file gave, so the prepared source shuffles and shards exactly like the streaming
one: same seed, same batches. Images and audio are decoded into the same layout by data/media_prepare.py.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress
from transformers import PreTrainedTokenizerFast

from data.config import DataConfig
from data.errors import DataError
from data.files import FilesSpec
from data.hub import HFSpec
from data.shards import FORMATS, PREPARED_INDEX
from data.sources import resolve_source
from data.tokenizer import Encoder, fingerprint

TASKS_PER_PROC = 4  # several tasks per process keep the processes busy when files differ in size
STREAM_BATCH = 256  # documents per task when tokenising a streamed dataset


def prepare_shards(
    cfg: DataConfig, out_dir: Path, *, tokenizer: PreTrainedTokenizerFast, num_procs: int
) -> dict[str, Any]:
    """Tokenise cfg's source (train and validation splits) into OUT_DIR; returns a summary of what was written."""
    start = time.perf_counter()
    out_dir = start_out_dir(cfg, out_dir, num_procs)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    splits, skipped = {}, Counter()
    for split in ("train", "validation"):
        spec = _source_spec(cfg, split)
        prepare = _prepare_stream if isinstance(spec, HFSpec) else _prepare_files
        splits[split], split_skips = prepare(spec, split, out_dir, tokenizer, dtype, num_procs)
        skipped.update(split_skips)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    index = {
        "format": FORMATS["text"],
        "version": 1,
        "source": cfg.source,
        "dtype": np.dtype(dtype).name,
        "tokenizer": {"fingerprint": fingerprint(tokenizer), "size": len(tokenizer)},
        "splits": splits,
        "skipped": dict(skipped),
    }
    write_index(out_dir, index)
    seconds = time.perf_counter() - start
    tokens = sum(s["tokens"] for s in splits.values())
    return {
        "out_dir": str(out_dir),
        "splits": {
            k: {n: v[n] for n in ("docs", "tokens")} | {"shards": len(v["shards"])} for k, v in splits.items()
        },
        "skipped": dict(skipped),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds),
    }


def start_out_dir(cfg: DataConfig, out_dir: Path, num_procs: int) -> Path:
    """OUT_DIR, created, for cfg's one source; refused when cfg mixes sources or OUT_DIR holds prepared shards."""
    if not isinstance(cfg.source, str):
        raise DataError("data prepare: give one source (not a mixture); prepare each and mix the directories")
    if num_procs < 1:
        raise ValueError(f"num_procs: expected >= 1, got {num_procs}")
    out_dir = Path(out_dir)
    if (out_dir / PREPARED_INDEX).exists():
        raise DataError(f"data prepare: {out_dir} already holds prepared shards; choose an empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def write_index(out_dir: Path, index: dict[str, Any]) -> None:
    """index.json, moved into place last: a half-written directory is never read."""
    tmp = out_dir / f".{PREPARED_INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out_dir / PREPARED_INDEX)


def _source_spec(cfg: DataConfig, split: str) -> FilesSpec | HFSpec:
    source = cfg.validation_source if split == "validation" and cfg.validation_source else cfg.source
    spec = resolve_source(source, cfg, split, held_out=cfg.validation_source is None)
    if not isinstance(spec, FilesSpec | HFSpec):
        raise DataError(f"data prepare: {source!r} is prepared already")
    return spec


def _prepare_files(
    spec: FilesSpec,
    split: str,
    out_dir: Path,
    tokenizer: PreTrainedTokenizerFast,
    dtype: type,
    num_procs: int,
) -> tuple[dict[str, Any], Counter[str]]:
    """Local files: contiguous groups of files tokenised in parallel, one shard per group."""
    groups = balanced_groups(spec, num_procs * TASKS_PER_PROC)
    tasks = [
        (replace(spec, files=group), f"{split}-{i:05d}", str(out_dir), dtype)
        for i, group in enumerate(groups)
    ]
    results = []
    with Progress() as progress, process_map(num_procs, _set_encoder, tokenizer) as imap:
        bar = progress.add_task(f"tokenising {split} ({len(spec.files)} files)", total=len(tasks))
        for result in imap(_tokenise_files, tasks):
            results.append(result)
            progress.advance(bar)
    files = [
        {"key": f.key, "docs": n}
        for group, (per_file, _, _) in zip(groups, results)
        for f, n in zip(group, per_file)
    ]
    return _split_summary(files, [shard for _, shard, _ in results]), sum(
        (Counter(r[2]) for r in results), Counter()
    )


def _prepare_stream(
    spec: HFSpec, split: str, out_dir: Path, tokenizer: PreTrainedTokenizerFast, dtype: type, num_procs: int
) -> tuple[dict[str, Any], Counter[str]]:
    """A streamed dataset: read in order here, tokenised in parallel in batches, written to one shard."""
    try:
        spec.load()
    except DataError:
        if split == "validation":  # many hub datasets have no validation split: leave it empty
            return _split_summary([], []), Counter()
        raise
    source = spec.open(stream=0, num_streams=1, seed=0, shuffle=False)
    texts = (text for _, text in source.documents(0, None))
    batches = iter(lambda: list(islice(texts, STREAM_BATCH)), [])
    writer = ShardWriter(out_dir, f"{split}-00000", dtype)
    with Progress() as progress, process_map(num_procs, _set_encoder, tokenizer) as imap:
        bar = progress.add_task(f"tokenising {split} of {spec.name} (documents)", total=None)
        for token_lists in imap(_tokenise_texts, batches):
            for tokens in token_lists:
                writer.add(tokens)
            progress.advance(bar, len(token_lists))
    shard = writer.close()
    return _split_summary([{"key": spec.name, "docs": shard["docs"]}], [shard]), Counter(source.skips.counts)


def _split_summary(files: list[dict], shards: list[dict]) -> dict[str, Any]:
    docs, tokens = sum(s["docs"] for s in shards), sum(s["tokens"] for s in shards)
    return {"files": files, "shards": shards, "docs": docs, "tokens": tokens}


def balanced_groups(spec: Any, count: int) -> list[list]:
    """Contiguous runs of files of about equal total size (the file order must be kept)."""
    sizes = np.array([max(os.path.getsize(f.path), 1) for f in spec.files], dtype=np.float64)
    bounds = np.searchsorted(np.cumsum(sizes), np.linspace(0, sizes.sum(), count + 1)[1:-1], side="left")
    edges = [0, *sorted(set(int(b) + 1 for b in bounds if b + 1 < len(sizes))), len(sizes)]
    return [spec.files[a:b] for a, b in zip(edges, edges[1:]) if b > a]


class ShardWriter:
    """Appends documents' tokens to NAME.bin and their offsets to NAME.idx.npy (moved into place on close)."""

    def __init__(self, out_dir: str | Path, name: str, dtype: type) -> None:
        self.out_dir, self.name, self.dtype = Path(out_dir), name, dtype
        self.tmp = self.out_dir / f".{name}.bin.tmp"
        self.fh = open(self.tmp, "wb")  # noqa: SIM115 (closed in close())
        self.offsets = [0]

    def add(self, tokens: np.ndarray) -> None:
        self.fh.write(tokens.astype(self.dtype).tobytes())
        self.offsets.append(self.offsets[-1] + len(tokens))

    def close(self) -> dict[str, Any]:
        self.fh.close()
        os.replace(self.tmp, self.out_dir / f"{self.name}.bin")
        np.save(self.out_dir / f"{self.name}.idx.npy", np.asarray(self.offsets, dtype=np.int64))
        return {"name": self.name, "docs": len(self.offsets) - 1, "tokens": self.offsets[-1]}


_encode: Encoder | None = None  # per worker process, set once by process_map's initializer


def _set_encoder(tokenizer: PreTrainedTokenizerFast) -> None:
    global _encode
    _encode = Encoder(tokenizer)


@contextmanager
def process_map(num_procs: int, initializer: Callable[[Any], None], arg: Any) -> Iterator[Callable]:
    """An ordered imap over num_procs processes, each set up once by initializer(arg) (in-process for one)."""
    if num_procs == 1:
        initializer(arg)
        yield map
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process
    with multiprocessing.Pool(num_procs, initializer=initializer, initargs=(arg,)) as pool:
        yield pool.imap


def _tokenise_files(task) -> tuple[list[int], dict[str, Any], dict[str, int]]:
    """One group of files -> one shard; returns (documents per file, the shard, skipped records)."""
    spec, name, out_dir, dtype = task
    source = spec.open(stream=0, num_streams=1, seed=0, shuffle=False)
    docs_per_file = [0] * len(spec.files)
    writer = ShardWriter(out_dir, name, dtype)
    for cursor, text in source.documents(0, None):
        writer.add(_encode(text))
        docs_per_file[cursor["file"]] += 1
    return docs_per_file, writer.close(), dict(source.skips.counts)


def _tokenise_texts(texts: list[str]) -> list[np.ndarray]:
    return [_encode(text) for text in texts]
