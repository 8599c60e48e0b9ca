"""Packing documents into fixed-length chunks: doc + [sep] + doc + [sep] ..., cut every `length` tokens.

No padding is wasted, and no token is lost: a document that does not fit continues in the next chunk.
The resumable state is where the unfinished chunk starts (the document stream's state before that
document, and a token offset into it), so the remainder is re-read instead of stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

State = dict[str, Any]


class Packer:
    def __init__(
        self,
        open_docs: Callable[[State | None], Any],
        *,
        length: int,
        sep_id: int,
        state: State | None = None,
    ) -> None:
        """open_docs(state) -> a document stream (`next()`, `state_dict()`) positioned at `state`."""
        self.length, self.sep = length, np.array([sep_id], dtype=np.int64)
        self._docs = open_docs(state["doc"] if state else None)
        self._doc_state = state["doc"] if state else None
        self._cur = np.zeros(0, dtype=np.int64)
        self._pos = 0
        self.chunks = state["chunks"] if state else 0
        if state and state["offset"]:
            self._pull()
            self._pos = state["offset"]

    def state_dict(self) -> State:
        if self._pos == len(self._cur):  # the next chunk starts with the next document
            return {"doc": self._docs.state_dict(), "offset": 0, "chunks": self.chunks}
        return {"doc": self._doc_state, "offset": self._pos, "chunks": self.chunks}

    def _pull(self) -> None:
        self._doc_state = self._docs.state_dict()
        self._cur = np.concatenate([self._docs.next(), self.sep])
        self._pos = 0

    def next(self) -> np.ndarray:
        """The next chunk of exactly `length` tokens; StopIteration when a finite stream runs out."""
        pieces, need = [], self.length
        while need:
            if self._pos == len(self._cur):
                self._pull()
            take = min(need, len(self._cur) - self._pos)
            pieces.append(self._cur[self._pos : self._pos + take])
            self._pos += take
            need -= take
        self.chunks += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class Unpacked:
    """Packer's interface for samples that are whole documents (images, audio clips): one item per document.

    The state is the document stream's state after the last item and the items taken (which seeds the next
    sample's randomness), so nothing is re-read beyond the shuffle block."""

    def __init__(self, open_docs: Callable[[State | None], Any], *, state: State | None = None) -> None:
        self._docs = open_docs(state["doc"] if state else None)
        self.chunks = state["chunks"] if state else 0

    def state_dict(self) -> State:
        return {"doc": self._docs.state_dict(), "chunks": self.chunks}

    def next(self) -> Any:
        """The next document as the stream holds it; StopIteration when a finite stream runs out."""
        item = self._docs.next()
        self.chunks += 1
        return item
