"""Prepared token shards (written by `data.prepare`) as a source: memory-mapped, random access."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.errors import DataError
from data.files import shard_by_file
from data.records import Cursor, Document, epoch_order

PREPARED_INDEX = "index.json"


class PreparedSource:
    """Token shards written by `data.prepare`: random access, so a stream jumps straight to its documents
    (its own files' documents, or every S-th document, by the same rule as the streamed files)."""

    def __init__(
        self, spec: PreparedSpec, *, stream: int, num_streams: int, seed: int, shuffle: bool
    ) -> None:
        self.spec, self.stream, self.num_streams = spec, stream, num_streams
        self.seed, self.shuffle = seed, shuffle
        split = spec.index["splits"][spec.split]
        self.file_docs = np.array([f["docs"] for f in split["files"]], dtype=np.int64)
        self.by_file = shard_by_file(len(self.file_docs), num_streams, spec.split)
        self.epochs_differ = self.by_file and shuffle and num_streams > 1
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
        S, s = self.num_streams, self.stream
        by_file = self.by_file  # as the streamed files shard, so the batches are the same
        c = cursor or {"file": s if by_file else 0, "g": 0}
        for fi in range(c["file"], len(order), S if by_file else 1):
            g0, g1 = int(epoch_start[fi]), int(epoch_start[fi + 1])
            start = max(c["g"], g0)
            first = start if by_file else start + (s - start) % S
            for g in range(first, g1, 1 if by_file else S):
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


FORMATS = {
    "text": "pretrain-token-shards",
    "image": "pretrain-image-shards",
    "audio": "pretrain-audio-shards",
}


def load_prepared_index(path: str, kind: str = "text", *, setting: str = "data.source") -> dict[str, Any]:
    """The prepared directory's index, refused in one line when it holds another kind of shards (text,
    image or audio) than the run reads."""
    try:
        with open(os.path.join(path, PREPARED_INDEX)) as fh:
            index = json.load(fh)
        found = {v: k for k, v in FORMATS.items()}[index["format"]]
        assert index["splits"]
    except (OSError, ValueError, KeyError, AssertionError, TypeError):
        raise DataError(
            f"{setting}: {path!r} has no valid {PREPARED_INDEX} (write one with `pretrain data prepare`)"
        ) from None
    if found != kind:
        held = "token shards" if found == "text" else f"decoded {found} shards"
        raise DataError(
            f"{setting}: {path!r} holds prepared {held}, but this run's model reads {kind}; give shards "
            "that `pretrain data prepare` wrote with a config of this model"
        )
    return index
