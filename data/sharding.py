"""Per-stream document streams: epochs, a seeded shuffle buffer we own, weighted mixtures.

The shuffle buffer is a block shuffle: the next `block` documents of the stream are read and emitted in a
permutation seeded by (seed, stream, epoch, block number). Its content is therefore reconstructible from
a tiny state (the cursor where the block starts, the block number, how many were emitted): resuming
re-reads one block, in time independent of how far the run got, and loses or repeats nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from data.errors import DataError
from data.records import Cursor, Document, Source

Encode = Callable[[str], np.ndarray]
MAX_BLOCK_SIZE = (
    32 << 20
)  # characters (or tokens) per shuffle block: bounds a worker's memory on long documents
# With file-level sharding a stream's own files can hold no train record in one epoch and some in the next
# (the file order is reshuffled): that many empty epochs in a row, not one, mean a stream without data.
MAX_EMPTY_EPOCHS = 64
State = dict[str, Any]


class DocStream:
    """One stream's documents as token arrays, epoch after epoch (or one epoch when finite)."""

    def __init__(
        self,
        source: Source,
        *,
        encode: Encode,
        name: str,
        seed: int,
        stream: int,
        block: int,
        shuffle: bool,
        infinite: bool,
        state: State | None = None,
    ) -> None:
        self.source, self.encode, self.name = source, encode, name
        self.seed, self.stream, self.block_size = seed, stream, block
        self.shuffle, self.infinite = shuffle, infinite
        s = state or {"epoch": 0, "cursor": None, "block": 0, "taken": 0}
        self._empty_epochs = 0  # consecutive epochs without a document (only ever > 0 inside next())
        self._epoch, self._cursor, self._block_no = s["epoch"], s["cursor"], s["block"]
        self._load_block()
        self._taken = s["taken"]

    def state_dict(self) -> State:
        return {"epoch": self._epoch, "cursor": self._cursor, "block": self._block_no, "taken": self._taken}

    def next(self) -> np.ndarray:
        """The next document's tokens; StopIteration at the end of a finite stream."""
        while self._taken >= len(self._docs):
            self._advance()
        doc = self._docs[self._taken]
        self._taken += 1
        return doc if isinstance(doc, np.ndarray) else self.encode(doc)

    def _load_block(self) -> None:
        docs: list[Document] = []
        self._end: Cursor | None = self._cursor
        self._epoch_done, size = True, 0
        for cursor, doc in self.source.documents(self._epoch, self._cursor):
            docs.append(doc)
            self._end, size = cursor, size + len(doc)
            if len(docs) == self.block_size or size >= MAX_BLOCK_SIZE:
                self._epoch_done = False
                break
        if self.shuffle and len(docs) > 1:
            rng = np.random.default_rng([self.seed, self.stream, self._epoch, self._block_no])
            docs = [docs[i] for i in rng.permutation(len(docs))]
        self._docs = docs

    def _advance(self) -> None:
        if not self._epoch_done:
            self._cursor, self._block_no = self._end, self._block_no + 1
        elif not self.infinite:
            raise StopIteration
        else:
            empty = self._block_no == 0 and not self._docs
            self._empty_epochs = self._empty_epochs + 1 if empty else 0
            varies = getattr(self.source, "epochs_differ", False)  # whose documents it gets changes
            if self._empty_epochs >= (MAX_EMPTY_EPOCHS if varies else 1):
                skips = getattr(self.source, "skips", None)
                detail = f"; skipped records: {dict(skips.counts)}" if skips and skips.counts else ""
                raise DataError(
                    f"data.source: {self.name!r} gave virtual stream {self.stream} no usable document in "
                    f"{self._empty_epochs} epoch(s) in a row up to epoch {self._epoch} (fewer documents "
                    f"than virtual streams, or no text){detail}"
                )
            self._epoch, self._cursor, self._block_no = self._epoch + 1, None, 0
        self._load_block()
        self._taken = 0


class Mixture:
    """Draws each document from one of several streams with probability ~ weight (seeded per draw).

    A finite part that runs out is dropped and the rest renormalised, so a finite mixture ends when all do.
    """

    def __init__(
        self,
        parts: Sequence[DocStream],
        weights: Sequence[float],
        *,
        seed: int,
        stream: int,
        state: State | None = None,
    ) -> None:
        self.parts, self.seed, self.stream = list(parts), seed, stream
        self.weights = np.asarray(weights, dtype=np.float64)
        self._draws = state["draws"] if state else 0
        self._done = list(state["done"]) if state else [False] * len(self.parts)

    def state_dict(self) -> State:
        return {"draws": self._draws, "done": list(self._done), "parts": [p.state_dict() for p in self.parts]}

    def next(self) -> np.ndarray:
        while not all(self._done):
            weights = np.where(self._done, 0.0, self.weights)
            rng = np.random.default_rng([self.seed, self.stream, 0x313C, self._draws])
            part = int(rng.choice(len(weights), p=weights / weights.sum()))
            self._draws += 1
            try:
                return self.parts[part].next()
            except StopIteration:
                self._done[part] = True
        raise StopIteration


class Part(NamedTuple):
    source: Source
    name: str
    weight: float
    seed: int


def build_stream(
    parts: Sequence[Part],
    *,
    encode: Encode,
    stream: int,
    block: int,
    shuffle: bool,
    infinite: bool,
    state: State | None,
) -> DocStream | Mixture:
    """A stream over one source, or a weighted mixture of several; `state` from a previous `state_dict()`."""
    streams = [
        DocStream(
            part.source,
            encode=encode,
            name=part.name,
            seed=part.seed,
            stream=stream,
            block=block,
            shuffle=shuffle,
            infinite=infinite,
            state=state if len(parts) == 1 else (state["parts"][i] if state else None),
        )
        for i, part in enumerate(parts)
    ]
    if len(streams) == 1:
        return streams[0]
    return Mixture(streams, [part.weight for part in parts], seed=parts[0].seed, stream=stream, state=state)
