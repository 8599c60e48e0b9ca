"""`pretrain data prepare` for image and audio runs: decode every record once into memory-mapped shards.

Layout of OUT_DIR, as data/prepare.py's token shards: `{split}-{n:05d}.bin` (the records' values back to
back), `{split}-{n:05d}.idx.npy` (int64 offsets, one more than records), `{split}-{n:05d}.labels.npy`
(int64 classes, -1 unknown), for images `{split}-{n:05d}.shapes.npy` (int32 height, width),
`{split}-files.npy` (int64: how many records each source file gave, in the source's file order, so the
prepared source numbers and shards the records as the folder does: same seed, same batches; an array, not
JSON, as image folders have a file per record), and `index.json` (written last: modality, settings, shards).

Images are (H, W, C) uint8 in the model's channels, resized (bicubic) so the shorter side is `short_side`
(training crops from them). Audio is mono int16 at the model's sample rate: wav and flac are mostly 16-bit
PCM, which int16 keeps exactly (a clip already at the model's rate reads back bit for bit, as
soundfile decodes it), at half of float32's size; float16, as small, keeps 11 significant bits, coarser than
16-bit PCM above 1/16 of full scale. Resampled values beyond full scale are clipped.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from data.config import DataConfig, Modality
from data.errors import DataError
from data.media import MediaFilesSpec, MediaRecord, decode_audio, decode_image, resolve_media_source
from data.prepare import TASKS_PER_PROC, ShardWriter, balanced_groups, process_map, start_out_dir, write_index
from data.shards import FORMATS


def default_short_side(image_size: int) -> int:
    """A little above the model's image, as ImageNet's 256 for 224: crops keep some context to choose from."""
    return math.ceil(image_size * 256 / 224)


@dataclass(frozen=True, kw_only=True)
class MediaSettings:
    """What the stored arrays are: images in `channels` with shorter side `short_side`, or audio at
    `sample_rate` (the model's, so nothing is converted while training)."""

    modality: Modality
    channels: int = 3
    short_side: int = 0
    sample_rate: int = 0

    def index(self) -> dict[str, Any]:
        if self.modality == "image":
            return {"channels": self.channels, "short_side": self.short_side, "dtype": "uint8"}
        return {"sample_rate": self.sample_rate, "dtype": "int16"}

    def decode(self, record: MediaRecord) -> np.ndarray:
        if self.modality == "image":
            return resize_short_side(decode_image(record, self.channels), self.short_side)
        audio = decode_audio(record, self.sample_rate)
        return np.clip(np.round(audio * 32768), -32768, 32767).astype(np.int16)


def resize_short_side(image: np.ndarray, side: int) -> np.ndarray:
    """(H, W, C) uint8 with min(H, W) == side, aspect kept (bicubic, Pillow); unchanged when it is already."""
    from PIL import Image

    h, w = image.shape[:2]
    if min(h, w) == side:
        return image
    height, width = (side, round(w * side / h)) if h <= w else (round(h * side / w), side)
    squeeze = image.shape[-1] == 1
    out = np.asarray(
        Image.fromarray(image[..., 0] if squeeze else image).resize((width, height), Image.Resampling.BICUBIC)
    )
    return out[..., None] if squeeze else out


def prepare_media_shards(
    cfg: DataConfig, out_dir: Path, *, settings: MediaSettings, num_procs: int
) -> dict[str, Any]:
    """Decode cfg's image or audio source (train and validation splits) into OUT_DIR; returns a summary."""
    start = time.perf_counter()
    out_dir = start_out_dir(cfg, out_dir, num_procs)
    splits, skipped = {}, Counter()
    for split in ("train", "validation"):
        spec = _source_spec(cfg, split, settings.modality)
        splits[split], split_skips = _prepare_files(spec, split, out_dir, settings, num_procs)
        skipped.update(split_skips)
    index = {
        "format": FORMATS[settings.modality],
        "version": 1,
        "modality": settings.modality,
        "source": cfg.source,
        "settings": settings.index(),
        "splits": splits,
        "skipped": dict(skipped),
    }
    write_index(out_dir, index)
    seconds = time.perf_counter() - start
    records = sum(s["records"] for s in splits.values())
    return {
        "out_dir": str(out_dir),
        "modality": settings.modality,
        "settings": settings.index(),
        "splits": {k: {"records": v["records"], "shards": len(v["shards"])} for k, v in splits.items()},
        "skipped": dict(skipped),
        "seconds": round(seconds, 2),
        "records_per_s": round(records / seconds),
    }


def _source_spec(cfg: DataConfig, split: str, modality: Modality) -> MediaFilesSpec:
    separate = split == "validation" and cfg.validation_source
    source = cfg.validation_source if separate else cfg.source
    spec = resolve_media_source(
        source,
        modality,
        split=split,
        held_out=None if cfg.validation_source else cfg.validation_fraction,
        field=cfg.media_field,
        label_field="label",
        setting="data.validation_source" if separate else "data.source",
    )
    if not isinstance(spec, MediaFilesSpec):
        what = {
            "BuiltinSpec": "is generated from each record's number (nothing to decode)",
            "HFMediaSpec": "is a hub dataset (hf: sources are not prepared yet)",
        }.get(type(spec).__name__, "is prepared already")
        raise DataError(f"data prepare: {source!r} {what}; prepare local {modality} files")
    return spec


def _prepare_files(
    spec: MediaFilesSpec, split: str, out_dir: Path, settings: MediaSettings, num_procs: int
) -> tuple[dict[str, Any], Counter[str]]:
    """Contiguous groups of files decoded in parallel, one shard per group; every source file is listed
    (with 0 records when all of them are in the other split), so the epoch's file order is the folder's."""
    groups = balanced_groups(spec, num_procs * TASKS_PER_PROC)
    tasks = [(replace(spec, files=group), f"{split}-{i:05d}", str(out_dir)) for i, group in enumerate(groups)]
    results = []
    with Progress() as progress, process_map(num_procs, _set_settings, settings) as imap:
        bar = progress.add_task(f"decoding {split} ({len(spec.files)} files)", total=len(tasks))
        for result in imap(_decode_files, tasks):
            results.append(result)
            progress.advance(bar)
    per_file = np.array([n for per_group, _, _ in results for n in per_group], dtype=np.int64)
    np.save(out_dir / f"{split}-files.npy", per_file)
    shards = [shard for _, shard, _ in results]
    summary = {"files": len(per_file), "shards": shards, "records": sum(s["records"] for s in shards)}
    return summary, sum((Counter(r[2]) for r in results), Counter())


class _MediaShardWriter(ShardWriter):
    """A token shard's values and offsets, plus each record's label and (images) height and width."""

    def __init__(self, out_dir: str | Path, name: str, image: bool) -> None:
        super().__init__(out_dir, name, np.uint8 if image else np.int16)
        self.image, self.labels, self.shapes = image, [], []

    def add_record(self, array: np.ndarray, label: int) -> None:
        self.add(array.reshape(-1))
        self.labels.append(label)
        self.shapes.append(array.shape[:2])

    def close(self) -> dict[str, Any]:
        shard = super().close()
        base = self.out_dir / self.name
        np.save(f"{base}.labels.npy", np.asarray(self.labels, dtype=np.int64))
        if self.image:
            np.save(f"{base}.shapes.npy", np.asarray(self.shapes, dtype=np.int32).reshape(-1, 2))
        return {"name": self.name, "records": shard["docs"], "values": shard["tokens"]}


_settings: MediaSettings | None = None  # per worker process, set once by process_map's initializer


def _set_settings(settings: MediaSettings) -> None:
    global _settings
    _settings = settings


def _decode_files(task) -> tuple[list[int], dict[str, Any], dict[str, int]]:
    """One group of files -> one shard; returns (records per file, the shard, skipped records)."""
    spec, name, out_dir = task
    assert _settings is not None
    source = spec.open(stream=0, num_streams=1, seed=0, shuffle=False)
    per_file = [0] * len(spec.files)
    writer = _MediaShardWriter(out_dir, name, _settings.modality == "image")
    for cursor, record in source.documents(0, None):
        try:
            array = _settings.decode(record)
        except DataError:
            source.skips.add("undecodable", record.key, cursor["rec"] - 1)
            continue
        writer.add_record(array, record.label)
        per_file[cursor["file"]] += 1
    return per_file, writer.close(), dict(source.skips.counts)
