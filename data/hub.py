"""Hugging Face datasets, streamed: `split_dataset_by_node` shards them, their own state is the cursor."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from data.errors import DataError
from data.records import Cursor, Document, SkipLog, bounded_sample

if TYPE_CHECKING:  # imported lazily: datasets costs seconds to import and is only needed for hf: sources
    import datasets


class HFSource:
    """A streamed Hugging Face dataset; `split_dataset_by_node` shards it, its own state is the cursor."""

    def __init__(self, spec: HFSpec, *, stream: int, num_streams: int, seed: int, shuffle: bool) -> None:
        self.spec, self.stream, self.num_streams = spec, stream, num_streams
        self.seed, self.shuffle = seed, shuffle
        self.skips = SkipLog()
        self._dataset = None  # loaded once: every shuffle block starts a new iteration over it
        quiet = logging.getLogger("datasets.iterable_dataset")
        if _no_lost_buffer_warning not in quiet.filters:
            quiet.addFilter(_no_lost_buffer_warning)

    def documents(self, epoch: int, cursor: Cursor | None) -> Iterator[tuple[Cursor, Document]]:
        from datasets.distributed import split_dataset_by_node

        if self._dataset is None:
            self._dataset = self.spec.load()
        ds = split_dataset_by_node(self._dataset, rank=self.stream, world_size=self.num_streams)
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


def _no_lost_buffer_warning(record: logging.LogRecord) -> bool:
    """datasets warns on resume that a shuffle buffer's content is not restored; with buffer_size=1 there is none."""
    return "shuffle buffer of a dataset without the buffer content" not in record.getMessage()


@dataclass(frozen=True)
class HFSpec:
    name: str  # as written in the config: hf:NAME[:CONFIG]
    dataset: str
    config: str | None
    split: str
    field: str

    def load(self) -> datasets.IterableDataset:
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
        yield from bounded_sample(
            self.open(stream=0, num_streams=1, seed=0, shuffle=False), self.name, max_chars
        )


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """The Hugging Face hub offline inside the block, as under HF_HUB_OFFLINE=1 (which the libraries read once, at
    import): what this finds is what a run on a node without network finds."""
    import datasets.config
    import huggingface_hub.constants

    saved = huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def check_cached(spec: HFSpec, setting: str, field_key: str = "data.text_field") -> None:
    """`spec` loads without the network (its builder is in the local cache), and has the configured column."""
    import datasets

    try:
        with hub_offline():
            builder = datasets.load_dataset_builder(spec.dataset, spec.config)
    except Exception as exc:  # the hub and loaders raise many types; one clear line is what helps
        raise DataError(
            f"{setting}: {spec.name!r} is not usable offline ({type(exc).__name__}): not in the local Hugging "
            "Face cache"
        ) from None
    features = builder.info.features
    if features is not None and spec.field not in features:
        raise DataError(
            f"{setting}: {spec.name!r} has no column {spec.field!r} (columns: {', '.join(features)}); "
            f"set {field_key}"
        )
