"""A data order that does not depend on the number of processes: virtual streams mapped onto ranks and workers.

The run's data is V *virtual streams*, each a deterministic, resumable sequence of micro-batches over its own
share of the documents (its own files when a source has at least V files, else every V-th record), with
all randomness (shuffle, masking, span noise) seeded by the virtual stream and its position. The global
micro-batch sequence is fixed by V alone: global micro-batch k is micro-batch k // V of virtual stream
k % V. A step of W ranks x A accumulation steps consumes B = W x A consecutive global micro-batches:
rank r's a-th micro-batch of step t is k = t x B + r x A + a, so which rank computes a micro-batch may
change with the world size, but the micro-batches of a step do not.

Physically, rank r's loader delivers its micro-batches round-robin from n = max(num_workers, 1) workers
(the loader's `j`-th batch from worker j mod n). Each virtual stream must be served by exactly one worker,
which holds when V is a multiple of B x n / gcd(A, n) (`Layout.check`). The saved state is per virtual
stream (where its next micro-batch starts), so any layout with the same V and micro-batch size that meets
that condition restores it. Pure Python: a run can validate a world-size change before importing torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from math import gcd
from typing import Any

from data.errors import DataError

STATE_VERSION = 2
MAX_LISTED_WORKERS = 16  # num_workers values an error message considers when naming working ones


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Where the global micro-batches go: world_size ranks, grad_accum micro-batches per rank and step,
    num_workers loader workers per rank (0: in the training process), virtual_streams V."""

    world_size: int
    grad_accum: int
    num_workers: int
    virtual_streams: int

    @property
    def global_batch(self) -> int:
        """B: micro-batches per optimizer step, over all ranks."""
        return self.world_size * self.grad_accum

    @property
    def workers(self) -> int:
        return max(self.num_workers, 1)

    @property
    def unit(self) -> int:
        """V must be a multiple of this for every virtual stream to have exactly one worker."""
        return min_virtual_streams(self.world_size, self.grad_accum, self.num_workers)

    def check(self) -> None:
        """One-line DataError when the virtual streams cannot be dealt out to this layout's workers."""
        V, B = self.virtual_streams, self.global_batch
        if V % self.unit == 0:
            return
        worlds = [w for w in _divisors(B) if V % min_virtual_streams(w, B // w, self.num_workers) == 0]
        workers = [
            n
            for n in range(MAX_LISTED_WORKERS + 1)
            if V % min_virtual_streams(self.world_size, self.grad_accum, n) == 0
        ]
        raise DataError(
            f"data.virtual_streams: {V} virtual streams cannot be dealt out to world size {self.world_size} x "
            f"grad_accum {self.grad_accum} x num_workers {self.num_workers} (needs a multiple of "
            f"{self.unit}); with the same global batch of {B} micro-batches, world sizes that work with "
            f"num_workers={self.num_workers}: {_listed(worlds)}; num_workers that work at world size "
            f"{self.world_size}: {_listed(workers)}"
        )

    def stream(self, rank: int, index: int, start: int) -> int:
        """The virtual stream of rank's `index`-th micro-batch, counting from global micro-batch `start`."""
        A = self.grad_accum
        return (start + (index // A) * self.global_batch + rank * A + index % A) % self.virtual_streams

    def period(self) -> int:
        """Micro-batches of one rank after which its virtual streams repeat (A x V / B)."""
        return self.grad_accum * self.virtual_streams // self.global_batch

    def rank_streams(self, rank: int, start: int) -> list[int]:
        """The virtual streams rank owns from `start` on (the same set whatever its first index)."""
        return sorted({self.stream(rank, j, start) for j in range(self.period())})

    def worker_streams(self, rank: int, worker: int, start: int, first_index: int) -> list[int]:
        """The virtual streams a worker serves when the rank's loader starts at `first_index`."""
        n = self.workers
        return sorted(
            {self.stream(rank, first_index + worker + i * n, start) for i in range(self.period() // n)}
        )


def min_virtual_streams(world_size: int, grad_accum: int, num_workers: int) -> int:
    """The smallest V that serves each virtual stream from one worker: B x n / gcd(A, n)."""
    n = max(num_workers, 1)
    return world_size * grad_accum * n // gcd(grad_accum, n)


def default_virtual_streams(world_size: int, grad_accum: int, num_workers: int) -> int:
    """V when `data.virtual_streams` is unset: B x n. Any world size dividing B then restores it with the
    same num_workers (the minimum, B x n / gcd(A, n), can refuse a later grad_accum of 1)."""
    return world_size * grad_accum * max(num_workers, 1)


def expected_batches(stream: int, position: int, virtual_streams: int) -> int:
    """Micro-batches virtual stream `stream` has delivered once `position` global micro-batches were used."""
    return (position - stream + virtual_streams - 1) // virtual_streams


def layout_of(state: Mapping[str, Any]) -> Layout:
    """The layout a saved data state (a rank's or a merged one) was written with."""
    _check_version(state)
    saved = state["layout"]
    return Layout(
        world_size=saved["world_size"],
        grad_accum=saved["grad_accum"],
        num_workers=saved["num_workers"],
        virtual_streams=state["virtual_streams"],
    )


def position_of(state: Mapping[str, Any]) -> int:
    """The global micro-batch position of a saved state (a rank's, at a step boundary, or a merged one)."""
    _check_version(state)
    if "position" in state:  # merged
        return state["position"]
    layout, delivered = layout_of(state), state["delivered"]
    if delivered % layout.grad_accum:
        raise DataError(
            f"the data state of rank {state['layout']['rank']} was saved mid-step ({delivered} micro-batches, "
            f"grad_accum {layout.grad_accum}); only a step boundary can be resumed at another layout"
        )
    return state["start"] + delivered // layout.grad_accum * layout.global_batch


def merge_states(states: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Every rank's saved data state -> one state that any layout with the same V can load.

    Refuses (one line) a set that is not one consistent step of one run: missing or repeated ranks,
    other settings, different positions, or a virtual stream whose count of delivered micro-batches is
    not what the position implies (nothing is dropped silently).
    """
    states = list(states)
    if not states:
        raise DataError("merge_states: no data states given")
    first = states[0]
    layout = layout_of(first)
    ranks = sorted(s["layout"]["rank"] for s in states)
    if ranks != list(range(layout.world_size)):
        raise DataError(
            f"data states of ranks {ranks} given, the run had {layout.world_size} rank(s): each rank's "
            "state is needed once"
        )
    position = position_of(first)
    streams: dict[str, Any] = {}
    for s in states:
        if layout_of(s) != layout or s["meta"] != first["meta"]:
            raise DataError(f"the data state of rank {s['layout']['rank']} has other settings than rank 0's")
        if position_of(s) != position:
            raise DataError(
                f"the data state of rank {s['layout']['rank']} is at global micro-batch {position_of(s)}, "
                f"rank {first['layout']['rank']}'s at {position}: they are not from the same step"
            )
        streams.update(s["streams"])
    merged = {
        "version": STATE_VERSION,
        "meta": first["meta"],
        "virtual_streams": layout.virtual_streams,
        "layout": {k: v for k, v in first["layout"].items() if k != "rank"},  # the saved run's, for its B
        "position": position,
        "streams": streams,
    }
    check_streams(merged, range(layout.virtual_streams), position)
    return merged


def check_streams(state: Mapping[str, Any], wanted: Iterable[int], position: int) -> None:
    """Every wanted virtual stream is in the state, at the count of micro-batches `position` implies."""
    V = state["virtual_streams"]
    for v in wanted:
        saved = state["streams"].get(str(v))
        if saved is None:
            raise DataError(
                f"the data state has no virtual stream {v} of {V}: restoring at another layout needs "
                "every rank's state (data.merge_states)"
            )
        if saved["batches"] != expected_batches(v, position, V):
            raise DataError(
                f"the data state's virtual stream {v} delivered {saved['batches']} micro-batches, "
                f"{expected_batches(v, position, V)} expected at global micro-batch {position}"
            )


def plan_resume(
    state: Mapping[str, Any], *, world_size: int, num_workers: int, micro_batch_size: int | None = None
) -> int:
    """The grad_accum that keeps the saved global batch at `world_size`, after checking that the saved data
    can be dealt out to that layout; a one-line DataError naming values that work otherwise.

    `state`: any one rank's saved data state (they share layout and settings), or a merged one. Cheap: no
    torch, no data read.
    """
    saved = layout_of(state)
    saved_micro = state["meta"]["batch_size"]
    if micro_batch_size is not None and micro_batch_size != saved_micro:
        raise DataError(
            f"train.micro_batch_size: the checkpoint used {saved_micro}, this run {micro_batch_size}; the "
            f"data order is counted in micro-batches, so resume with train.micro_batch_size={saved_micro}"
        )
    B = saved.global_batch
    if world_size < 1 or B % world_size:
        raise DataError(
            f"cannot resume at world size {world_size}: the checkpoint's global batch is {B} micro-batches "
            f"(world {saved.world_size} x grad_accum {saved.grad_accum}), so the world size must divide "
            f"it: {_listed(_divisors(B))}"
        )
    layout = Layout(
        world_size=world_size,
        grad_accum=B // world_size,
        num_workers=num_workers,
        virtual_streams=saved.virtual_streams,
    )
    layout.check()
    return layout.grad_accum


def _check_version(state: Mapping[str, Any]) -> None:
    if state.get("version") != STATE_VERSION:
        raise DataError(
            f"data state version {state.get('version')!r} is not {STATE_VERSION} (written by an older "
            "data pipeline without virtual streams); it cannot be resumed by this one"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _listed(values: Sequence[int]) -> str:
    return ", ".join(map(str, values)) if values else "none"
