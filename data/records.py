"""What every source shares: the protocols, document cursors, the epoch file order, skip counting.

A `SourceSpec` is resolved once in the main process (globs expanded, files checked, so a bad path fails
before any worker starts) and opened per stream (rank x loader worker) as a `Source`. A source yields
one epoch of the stream's documents from a cursor, as (cursor_after, document) pairs. A document is a
str (to be tokenised) or an int array (already tokenised). The cursor is a small JSON dict, so a
shuffle block can be re-read on resume without replaying the run.

Sharding rule: the epoch's documents are numbered g = 0, 1, ... in the (seeded) file order, and stream
s of S owns the documents with g % S == s, so every document goes to exactly one stream, for any S.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from data.errors import DataError

log = logging.getLogger(__name__)

Cursor = dict[str, Any]
Document = str | np.ndarray


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


def epoch_order(num_files: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The file order of an epoch: the same in every stream, so the document numbering is global."""
    if not shuffle:
        return np.arange(num_files)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_files)


def bounded_sample(source: Source, name: str, max_chars: int) -> Iterator[str]:
    """About max_chars of text from the epoch-0 order; a source without any usable text is an error."""
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
