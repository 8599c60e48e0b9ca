"""`pretrain data prepare`: tokenise a source once into memory-mapped binary token shards.

Layout of OUT_DIR: `{split}-{n:05d}.bin` (the documents' tokens back to back, uint16 or uint32),
`{split}-{n:05d}.idx.npy` (int64 document offsets, one more than documents), `tokenizer/`, and
`index.json` (written last, so a half-written directory is never read). The index keeps how many
documents each source file gave, so the prepared source shuffles and shards exactly like the streaming
one: same seed, same batches.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress
from transformers import PreTrainedTokenizerFast

from data.config import DataConfig
from data.errors import DataError
from data.sources import PREPARED_INDEX, FilesSpec, resolve_source
from data.tokenizer import Encoder, fingerprint

FORMAT = "pretrain-token-shards"
TASKS_PER_PROC = 4  # several tasks per process keep the processes busy when files differ in size


def prepare_shards(
    cfg: DataConfig, out_dir: Path, *, tokenizer: PreTrainedTokenizerFast, num_procs: int
) -> dict[str, Any]:
    """Tokenise cfg's source (train and validation splits) into OUT_DIR; returns a summary of what was written."""
    if not isinstance(cfg.source, str):
        raise DataError("data prepare: give one source (not a mixture); prepare each and mix the directories")
    if num_procs < 1:
        raise ValueError(f"num_procs: expected >= 1, got {num_procs}")
    out_dir = Path(out_dir)
    if (out_dir / PREPARED_INDEX).exists():
        raise DataError(f"data prepare: {out_dir} already holds prepared shards; choose an empty directory")
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    splits, skipped = {}, Counter()
    for split in ("train", "validation"):
        spec = _files_spec(cfg, split)
        splits[split], split_skips = _prepare_split(spec, split, out_dir, tokenizer, dtype, num_procs)
        skipped.update(split_skips)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    index = {
        "format": FORMAT,
        "version": 1,
        "source": cfg.source,
        "dtype": np.dtype(dtype).name,
        "tokenizer": {"fingerprint": fingerprint(tokenizer), "size": len(tokenizer)},
        "splits": splits,
        "skipped": dict(skipped),
    }
    tmp = out_dir / f".{PREPARED_INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out_dir / PREPARED_INDEX)
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


def _files_spec(cfg: DataConfig, split: str) -> FilesSpec:
    source = cfg.validation_source if split == "validation" and cfg.validation_source else cfg.source
    spec = resolve_source(source, cfg, split, held_out=cfg.validation_source is None)
    if not isinstance(spec, FilesSpec):
        raise DataError(f"data prepare: {source!r} is not a local source (builtin or a file glob)")
    return spec


def _prepare_split(spec: FilesSpec, split: str, out_dir: Path, tokenizer, dtype, num_procs: int):
    tasks = [
        (replace(spec, files=group), f"{split}-{i:05d}", str(out_dir), tokenizer, dtype)
        for i, group in enumerate(_balanced_groups(spec, num_procs * TASKS_PER_PROC))
    ]
    results = []
    with Progress(transient=False) as progress:
        bar = progress.add_task(f"tokenising {split} ({len(spec.files)} files)", total=len(tasks))
        if num_procs == 1:
            for task in tasks:
                results.append(_tokenise_task(task))
                progress.advance(bar)
        else:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process
            with multiprocessing.Pool(num_procs) as pool:
                for result in pool.imap(_tokenise_task, tasks):
                    results.append(result)
                    progress.advance(bar)
    files = [
        {"key": f.key, "docs": n} for (group, *_), r in zip(tasks, results) for f, n in zip(group.files, r[0])
    ]
    shards = [{"name": name, "docs": sum(r[0]), "tokens": r[1]} for (_, name, *_), r in zip(tasks, results)]
    summary = {
        "files": files,
        "shards": shards,
        "docs": sum(s["docs"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
    }
    return summary, sum((Counter(r[2]) for r in results), Counter())


def _balanced_groups(spec: FilesSpec, count: int) -> list[list]:
    """Contiguous runs of files of about equal total size (the file order must be kept)."""
    sizes = np.array([max(os.path.getsize(f.path), 1) for f in spec.files], dtype=np.float64)
    bounds = np.searchsorted(np.cumsum(sizes), np.linspace(0, sizes.sum(), count + 1)[1:-1], side="left")
    edges = [0, *sorted(set(int(b) + 1 for b in bounds if b + 1 < len(sizes))), len(sizes)]
    return [spec.files[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def _tokenise_task(task) -> tuple[list[int], int, dict[str, int]]:
    """One group of files -> one shard; returns (documents per file, tokens, skipped records)."""
    spec, name, out_dir, tokenizer, dtype = task
    encode = Encoder(tokenizer)
    source = spec.open(stream=0, num_streams=1, seed=0, shuffle=False)
    docs_per_file = [0] * len(spec.files)
    offsets, total = [0], 0
    tmp = Path(out_dir, f".{name}.bin.tmp")
    with open(tmp, "wb") as fh:
        for cursor, text in source.documents(0, None):
            tokens = encode(text).astype(dtype)
            fh.write(tokens.tobytes())
            total += len(tokens)
            offsets.append(total)
            docs_per_file[cursor["file"]] += 1
    os.replace(tmp, Path(out_dir, f"{name}.bin"))
    np.save(Path(out_dir, f"{name}.idx.npy"), np.asarray(offsets, dtype=np.int64))
    return docs_per_file, total, dict(source.skips.counts)
