"""The resumable loader: sources -> virtual streams -> packing -> objective -> micro-batches, dealt to workers.

The data is `Layout.virtual_streams` virtual streams (see data/layout.py): each a deterministic sequence
of micro-batches over its own documents, with every random choice seeded by (seed, virtual stream,
position). Each rank's loader workers serve disjoint sets of them, in the order the layout fixes, and
every micro-batch travels with its virtual stream's state after it, so the rank's `state_dict()` is,
per virtual stream, where its next micro-batch starts: a few integers and cursors (no tokens, no RNG
state), small, JSON-serialisable, loaded by re-reading one shuffle block, and loadable at another world
size, grad_accum or worker count once every rank's state is merged (`data.merge_states`).
Images and audio (data/media_loader.py) go through the same `build_pipeline` with their own `Objective`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerFast

from data.config import OBJECTIVES, DataConfig, ObjectiveName
from data.errors import DataError
from data.layout import (
    STATE_VERSION,
    Layout,
    check_streams,
    default_virtual_streams,
    layout_of,
    min_virtual_streams,
    position_of,
)
from data.objectives import CausalLM, MaskedLM, SpanCorruption
from data.packing import Packer, Unpacked
from data.records import SourceSpec
from data.sharding import DocStream, Mixture, Part, build_stream
from data.shards import PreparedSpec
from data.sources import resolve_source
from data.tokenizer import SENTINELS, Encoder, fingerprint

TextObjective = CausalLM | MaskedLM | SpanCorruption
SPLITS = ("train", "validation")
StreamState = dict[str, Any]  # {"batches": micro-batches delivered, "state": the packer's state or None}


class Objective(Protocol):
    """What a virtual stream turns its items into samples with: text's objectives (items: packed chunks) or
    data/media_loader.py's samplers (items: whole records, one sample each)."""

    @property
    def random(self) -> bool:
        """Whether samples draw from the generator (else it is None)."""

    @property
    def chunk_len(self) -> int | None:
        """Documents are packed into chunks of this many tokens; None: each document is one item."""

    @property
    def sep_id(self) -> int:
        """The token between packed documents (unused when chunk_len is None)."""

    @property
    def rng_per_sample(self) -> bool:
        """A generator per sample, seeded by its item number; else one per micro-batch, seeded by the
        number of its first item (text: MLM masks and span noise)."""

    def __call__(self, item: Any, rng: np.random.Generator | None) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything a worker needs to build its virtual streams (picklable, so workers may be spawned)."""

    specs: Sequence[tuple[SourceSpec, float]]
    objective: Objective
    encode: Callable[[Any], Any]  # a document as read -> what the stream holds (text: its token ids)
    batch_size: int
    rank: int
    layout: Layout
    seed: int
    block: int
    shuffle: bool
    infinite: bool


@dataclass(frozen=True, kw_only=True)
class Start:
    """Where a rank's loader starts: global micro-batch `position` of a segment, its own index in it, and
    the state of each virtual stream it owns."""

    position: int = 0
    index: int = 0
    streams: dict[str, StreamState] | None = None  # None: every stream from its beginning


class VirtualStream:
    """One virtual stream's micro-batches: its documents, packed (or one per sample), turned into samples
    of the objective."""

    def __init__(self, plan: Plan, stream: int, saved: StreamState | None) -> None:
        self.plan, self.stream = plan, stream
        self.batches = saved["batches"] if saved else 0
        V = plan.layout.virtual_streams

        def open_docs(state: dict[str, Any] | None) -> DocStream | Mixture:
            parts = [
                Part(
                    spec.open(stream=stream, num_streams=V, seed=plan.seed + 7919 * i, shuffle=plan.shuffle),
                    spec.name,
                    weight,
                    plan.seed + 7919 * i,
                )
                for i, (spec, weight) in enumerate(plan.specs)
            ]
            return build_stream(
                parts,
                encode=plan.encode,
                stream=stream,
                block=plan.block,
                shuffle=plan.shuffle,
                infinite=plan.infinite,
                state=state,
            )

        state = saved["state"] if saved else None
        length = plan.objective.chunk_len
        self.packer: Packer | Unpacked = (
            Unpacked(open_docs, state=state)
            if length is None
            else Packer(open_docs, length=length, sep_id=plan.objective.sep_id, state=state)
        )
        self.done = False

    def state_dict(self) -> StreamState:
        return {"batches": self.batches, "state": self.packer.state_dict()}

    def next_batch(self) -> dict[str, np.ndarray] | None:
        """The next micro-batch (the last of a finite stream may be smaller); None once it has run out."""
        p = self.plan
        # generators keyed by position (per micro-batch or per sample): resuming at a micro-batch re-creates
        # them, and a micro-batch is where a saved state always points
        rng, samples = None, []
        for i in range(p.batch_size):
            if p.objective.random and (i == 0 or p.objective.rng_per_sample):
                rng = np.random.default_rng([p.seed, self.stream, self.packer.chunks])
            try:
                chunk = self.packer.next()
            except StopIteration:
                self.done = True
                break
            samples.append(p.objective(chunk, rng))
        if not samples:
            return None
        self.batches += 1
        return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


class PipelineDataset(IterableDataset):
    """One rank's micro-batches; inside a loader worker, that worker's share of them."""

    def __init__(self, plan: Plan, start: Start) -> None:
        self.plan, self.start = plan, start

    def __iter__(self) -> Iterator[tuple[int, StreamState, dict[str, np.ndarray]]]:
        p, start, layout = self.plan, self.start, self.plan.layout
        info = get_worker_info()
        worker = info.id if info else 0
        n = layout.workers
        saved = start.streams or {}
        streams = {
            v: VirtualStream(p, v, saved.get(str(v)))
            for v in layout.worker_streams(p.rank, worker, start.position, start.index)
        }
        index = start.index + worker
        while not all(s.done for s in streams.values()):
            stream = streams[layout.stream(p.rank, index, start.position)]
            index += n
            if stream.done:
                continue  # a finite stream ran out: the worker's others go on
            batch = stream.next_batch()
            if batch is not None:
                yield stream.stream, stream.state_dict(), batch


class DataPipeline:
    """What `build_loader` returns: iterate it for micro-batches; `state_dict()` goes into every checkpoint."""

    def __init__(
        self,
        dataset: PipelineDataset,
        *,
        prefetch_factor: int,
        meta: dict[str, Any],
        fixed_streams: int | None,
    ) -> None:
        self.dataset, self.meta, self._fixed_streams = dataset, meta, fixed_streams
        num_workers = dataset.plan.layout.num_workers
        if num_workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # else every forked worker warns
        self._loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            prefetch_factor=prefetch_factor if num_workers else None,
            collate_fn=_as_is,  # arrays cross from workers pickled: much cheaper than shared-memory tensors
        )
        self._restart()

    @property
    def layout(self) -> Layout:
        return self.dataset.plan.layout

    def _restart(self) -> None:
        plan, start = self.dataset.plan, self.dataset.start
        owned = self.layout.rank_streams(plan.rank, start.position)
        fresh: StreamState = {"batches": 0, "state": None}
        self._delivered = start.index
        self._streams = {str(v): (start.streams or {}).get(str(v), fresh) for v in owned}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._restart()
        try:
            for stream, state, batch in self._loader:
                self._streams[str(stream)] = state
                self._delivered += 1
                yield {k: torch.from_numpy(v) for k, v in batch.items()}
        except DataError as exc:  # from a worker: torch wraps it with the worker's traceback
            raise DataError(str(exc).strip().rsplit("DataError: ", 1)[-1]) from None

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: the global micro-batch its segment started at, how many it has delivered
        since, and each of its virtual streams' state after its last delivered micro-batch."""
        layout = self.layout
        state = {
            "version": STATE_VERSION,
            "meta": self.meta,
            "virtual_streams": layout.virtual_streams,
            "layout": _layout_dict(layout, self.dataset.plan.rank),
            "start": self.dataset.start.position,
            "delivered": self._delivered,
            "streams": self._streams,
        }
        try:
            return json.loads(json.dumps(state))
        except TypeError as exc:
            raise DataError(f"loader state is not JSON-serialisable: {exc}") from None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: this rank's own (same layout: exact, even mid-step), or at another layout
        a state that holds this rank's virtual streams at a step boundary (`data.merge_states` of all)."""
        saved = layout_of(state)  # checks the version
        changed = {k: (v, self.meta.get(k)) for k, v in state["meta"].items() if self.meta.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise DataError(f"cannot resume the data pipeline exactly, its settings changed ({detail})")
        V = saved.virtual_streams
        if self._fixed_streams is not None and self._fixed_streams != V:
            raise DataError(
                f"data.virtual_streams: the checkpoint has {V}, this run sets {self._fixed_streams}; "
                f"the data order depends on it: unset it or set {V}"
            )
        layout = replace(self.layout, virtual_streams=V)
        layout.check()
        rank = self.dataset.plan.rank
        if state["layout"] == _layout_dict(layout, rank):  # this rank, same layout: continue exactly
            start = Start(position=state["start"], index=state["delivered"], streams=state["streams"])
        else:
            position = position_of(state)
            wanted = layout.rank_streams(rank, position)
            check_streams(state, wanted, position)
            start = Start(position=position, streams={str(v): state["streams"][str(v)] for v in wanted})
        self.dataset.plan = replace(self.dataset.plan, layout=layout)
        self.dataset.start = start
        self._restart()


def _layout_dict(layout: Layout, rank: int) -> dict[str, int]:
    return {
        "world_size": layout.world_size,
        "grad_accum": layout.grad_accum,
        "num_workers": layout.num_workers,
        "rank": rank,
    }


def _as_is(batch: Any) -> Any:
    return batch


def check_loader_args(
    caller: str,
    objective: str,
    objectives: Sequence[str],
    *,
    split: str,
    batch_size: int,
    rank: int,
    world_size: int,
    grad_accum: int,
) -> None:
    """The arguments every loader builder (text, images, audio) refuses alike, naming `caller`."""
    if objective not in objectives:
        raise ValueError(f"objective: {objective!r} is not one of {', '.join(objectives)}")
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    if not (isinstance(batch_size, int) and batch_size >= 1 and 0 <= rank < world_size and grad_accum >= 1):
        raise ValueError(
            f"{caller}: need batch_size >= 1, grad_accum >= 1 and 0 <= rank < world_size, got "
            f"batch_size={batch_size}, grad_accum={grad_accum}, rank={rank}, world_size={world_size}"
        )


def build_loader(
    cfg: DataConfig,
    *,
    objective: ObjectiveName,
    tokenizer: PreTrainedTokenizerFast,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    split: Literal["train", "validation"] = "train",
    grad_accum: int = 1,
) -> DataPipeline:
    """Micro-batches of `objective` for one rank, which draws `grad_accum` of them per optimizer step (the
    global order depends on it: pass the loop's value). Train is infinite (epochs reshuffled by seed and
    epoch) over `data.virtual_streams` virtual streams; validation is one finite, deterministic pass (its
    last batches may be smaller) over one virtual stream per worker."""
    check_loader_args(
        "build_loader", objective, OBJECTIVES, split=split, batch_size=batch_size, rank=rank,
        world_size=world_size, grad_accum=grad_accum,
    )  # fmt: skip
    specs = _specs(cfg, split)
    for spec, _ in specs:
        _check_prepared(spec, tokenizer)
    meta = {
        "objective": objective,
        "split": split,
        "seq_len": cfg.seq_len,
        "batch_size": batch_size,
        "seed": seed,
        "sources": [[spec.name, weight] for spec, weight in specs],
        "shuffle": cfg.shuffle,
        "shuffle_buffer": cfg.shuffle_buffer,
    }
    return build_pipeline(
        cfg,
        specs=specs,
        objective=make_objective(objective, cfg, tokenizer),
        encode=Encoder(tokenizer),
        meta=meta,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        split=split,
        grad_accum=grad_accum,
    )


def build_pipeline(
    cfg: DataConfig,
    *,
    specs: Sequence[tuple[SourceSpec, float]],
    objective: Objective,
    encode: Callable[[Any], Any],
    meta: dict[str, Any],
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    split: str,
    grad_accum: int,
) -> DataPipeline:
    """The virtual streams, layout and loader shared by text (`build_loader`) and images and audio
    (data/media_loader.py): `objective` turns each stream's items into samples, `meta` holds the settings
    a saved state must match."""
    train = split == "train"
    workers = cfg.num_workers
    if train:
        fixed = cfg.virtual_streams
        V = fixed or default_virtual_streams(world_size, grad_accum, workers)
    else:  # nothing to resume: one virtual stream per worker, whatever the training layout
        fixed, grad_accum, V = None, 1, min_virtual_streams(world_size, 1, workers)
    layout = Layout(world_size=world_size, grad_accum=grad_accum, num_workers=workers, virtual_streams=V)
    layout.check()
    plan = Plan(
        specs=specs,
        objective=objective,
        encode=encode,
        batch_size=batch_size,
        rank=rank,
        layout=layout,
        seed=seed,
        block=cfg.shuffle_buffer,
        shuffle=cfg.shuffle and train,
        infinite=train,
    )
    return DataPipeline(
        PipelineDataset(plan, Start()), prefetch_factor=cfg.prefetch_factor, meta=meta, fixed_streams=fixed
    )


def make_objective(objective: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerFast) -> TextObjective:
    def token_id(attr: str) -> int:
        value = getattr(tokenizer, attr, None)
        if value is None:
            raise DataError(
                f"the tokenizer has no {attr.removesuffix('_id')} (needed by objective {objective!r}); "
                "build it with data.build_tokenizer for the model's family"
            )
        return int(value)

    if objective == "clm":
        return CausalLM(seq_len=cfg.seq_len, eos_id=token_id("eos_token_id"))
    if objective == "mlm":
        return MaskedLM(
            seq_len=cfg.seq_len,
            cls_id=token_id("cls_token_id"),
            sep_id=token_id("sep_token_id"),
            mask_id=token_id("mask_token_id"),
            special_ids=tuple(tokenizer.all_special_ids),
            vocab_size=len(tokenizer),
            probability=cfg.mlm_probability,
        )
    vocab = tokenizer.get_vocab()
    sentinels = tuple(vocab[s] for s in SENTINELS if s in vocab)
    if not sentinels:
        raise DataError("the tokenizer has no T5 sentinels <extra_id_0> ... (needed by objective 'span')")
    return SpanCorruption(
        seq_len=cfg.seq_len,
        eos_id=token_id("eos_token_id"),
        pad_id=token_id("pad_token_id"),
        sentinel_ids=sentinels,
        noise_density=cfg.noise_density,
        mean_span=cfg.mean_noise_span_length,
    )


def _specs(cfg: DataConfig, split: str) -> list[tuple[SourceSpec, float]]:
    if split == "validation" and cfg.validation_source is not None:
        return [
            (
                resolve_source(
                    cfg.validation_source, cfg, split, held_out=False, setting="data.validation_source"
                ),
                1.0,
            )
        ]
    held_out = cfg.validation_source is None
    return [(resolve_source(c.source, cfg, split, held_out=held_out), c.weight) for c in cfg.components]


def _check_prepared(spec: SourceSpec, tokenizer: PreTrainedTokenizerFast) -> None:
    if isinstance(spec, PreparedSpec) and spec.index["tokenizer"]["fingerprint"] != fingerprint(tokenizer):
        raise DataError(
            f"data.source: {spec.name!r} was tokenised with another tokenizer; use the one saved in "
            f"{os.path.join(spec.path, 'tokenizer')} or prepare the shards again"
        )
