"""The resumable loader: sources -> per-(rank, worker) document streams -> packing -> objective -> batches.

Each loader worker of each rank is one stream (stream = rank * workers + worker). torchdata's
StatefulDataLoader keeps which worker delivers next and each worker's pipeline state as of its last
delivered batch; our part of that state is a few integers and cursors (no tokens, no RNG state), so
`state_dict()` is small, JSON-serialisable, and loading it costs one shuffle block of reading.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerFast

from data.config import DataConfig
from data.errors import DataError
from data.objectives import CausalLM, MaskedLM, SpanCorruption
from data.packing import Packer
from data.records import SourceSpec
from data.sharding import DocStream, Mixture, Part, build_stream
from data.shards import PreparedSpec
from data.sources import resolve_source
from data.tokenizer import SENTINELS, Encoder, fingerprint

Objective = CausalLM | MaskedLM | SpanCorruption
OBJECTIVES = ("clm", "mlm", "span")
SPLITS = ("train", "validation")
STATE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything a worker needs to build its stream (picklable, so workers may be spawned)."""

    specs: Sequence[tuple[SourceSpec, float]]
    objective: Objective
    encode: Encoder
    batch_size: int
    rank: int
    world_size: int
    seed: int
    block: int
    shuffle: bool
    infinite: bool


class PipelineDataset(IterableDataset):
    """One rank's batches; inside a loader worker, that worker's share of them."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._state: dict[str, Any] = {"packer": None}  # as of the last batch yielded
        self._resume: dict[str, Any] | None = None  # where the next __iter__ starts (None: the beginning)

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = self._resume = state

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        p = self.plan
        start, self._resume = self._resume or {"packer": None}, None
        self._state = start
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stream, streams = p.rank * workers + worker, p.world_size * workers
        if start.get("streams", streams) != streams or start.get("stream", stream) != stream:
            raise DataError(
                f"loader state is for stream {start['stream']} of {start['streams']}, "
                f"this is stream {stream} of {streams} (world size or num_workers changed)"
            )

        def open_docs(state: dict[str, Any] | None) -> DocStream | Mixture:
            parts = [
                Part(
                    spec.open(stream=stream, num_streams=streams, seed=p.seed + 7919 * i, shuffle=p.shuffle),
                    spec.name,
                    weight,
                    p.seed + 7919 * i,
                )
                for i, (spec, weight) in enumerate(p.specs)
            ]
            return build_stream(
                parts,
                encode=p.encode,
                stream=stream,
                block=p.block,
                shuffle=p.shuffle,
                infinite=p.infinite,
                state=state,
            )

        packer = Packer(
            open_docs, length=p.objective.chunk_len, sep_id=p.objective.sep_id, state=start["packer"]
        )
        while True:
            # one generator per batch, keyed by position: resuming at a batch boundary re-creates it
            rng = np.random.default_rng([p.seed, stream, packer.chunks]) if p.objective.random else None
            samples = []
            for _ in range(p.batch_size):
                try:
                    chunk = packer.next()
                except StopIteration:
                    break
                samples.append(p.objective(chunk, rng))
            if not samples:
                return
            self._state = {"stream": stream, "streams": streams, "packer": packer.state_dict()}
            yield {k: np.stack([s[k] for s in samples]) for k in samples[0]}
            if len(samples) < p.batch_size:
                return


class DataPipeline:
    """What `build_loader` returns: iterate it for batches; `state_dict()` goes into every checkpoint."""

    def __init__(
        self, dataset: PipelineDataset, *, num_workers: int, prefetch_factor: int, meta: dict[str, Any]
    ) -> None:
        self.meta = meta
        if num_workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # else every forked worker warns
        with warnings.catch_warnings():  # torchdata 0.11 calls an API that recent torch deprecates
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            self._loader = StatefulDataLoader(
                dataset,
                batch_size=None,
                num_workers=num_workers,
                prefetch_factor=prefetch_factor if num_workers else None,
                collate_fn=_as_is,  # arrays cross from workers pickled: much cheaper than shared-memory tensors
            )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        try:
            for batch in self._loader:
                yield {k: torch.from_numpy(v) for k, v in batch.items()}
        except DataError as exc:  # from a worker: torch wraps it with the worker's traceback
            raise DataError(str(exc).strip().rsplit("DataError: ", 1)[-1]) from None

    def state_dict(self) -> dict[str, Any]:
        state = {"version": STATE_VERSION, "meta": self.meta, "loader": self._loader.state_dict()}
        try:
            return json.loads(json.dumps(state))
        except TypeError as exc:
            raise DataError(f"loader state is not JSON-serialisable: {exc}") from None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        changed = {k: (v, self.meta.get(k)) for k, v in state["meta"].items() if self.meta.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise DataError(f"cannot resume the data pipeline exactly, its settings changed ({detail})")
        self._loader.load_state_dict(state["loader"])


def _as_is(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return batch


def build_loader(
    cfg: DataConfig,
    *,
    objective: Literal["clm", "mlm", "span"],
    tokenizer: PreTrainedTokenizerFast,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    split: Literal["train", "validation"] = "train",
) -> DataPipeline:
    """Batches of `objective` for one rank. Train is infinite (epochs reshuffled by seed and epoch);
    validation is one finite, deterministic pass (its last batch may be smaller)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    if not (isinstance(batch_size, int) and batch_size >= 1 and 0 <= rank < world_size):
        raise ValueError(
            f"build_loader: need batch_size >= 1 and 0 <= rank < world_size, got "
            f"batch_size={batch_size}, rank={rank}, world_size={world_size}"
        )
    specs = _specs(cfg, split)
    for spec, _ in specs:
        _check_prepared(spec, tokenizer)
    train = split == "train"
    plan = Plan(
        specs=specs,
        objective=make_objective(objective, cfg, tokenizer),
        encode=Encoder(tokenizer),
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        block=cfg.shuffle_buffer,
        shuffle=cfg.shuffle and train,
        infinite=train,
    )
    meta = {
        "objective": objective,
        "split": split,
        "seq_len": cfg.seq_len,
        "batch_size": batch_size,
        "rank": rank,
        "world_size": world_size,
        "num_workers": cfg.num_workers,
        "seed": seed,
        "sources": [[spec.name, weight] for spec, weight in specs],
        "shuffle_buffer": cfg.shuffle_buffer,
    }
    return DataPipeline(
        PipelineDataset(plan), num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor, meta=meta
    )


def make_objective(objective: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerFast) -> Objective:
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
