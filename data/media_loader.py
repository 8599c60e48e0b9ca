"""The resumable loader for images and audio: media sources -> per-(rank, worker) record streams -> decode,
augment and mask, seeded per sample -> batches.

It shares text's machinery (data/loader.py, data/sharding.py): streams = ranks x loader workers, the
g % S sharding rule, seeded shuffle blocks, mixtures, torchdata's StatefulDataLoader and `DataPipeline`'s
versioned, settings-checked state. There is no tokenizer and no packing: one record is one sample, and a
worker's state is its record stream's cursor plus how many samples it has made (which seeds the next one).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from data.config import DataConfig
from data.errors import DataError
from data.loader import SPLITS, DataPipeline
from data.media import MediaRecord, Modality, decode_audio, decode_image, resolve_media_source
from data.media_objectives import BestRQ, ImageAugment, ImageModel, SpeechModel, mae_noise, simmim_mask
from data.records import SourceSpec
from data.sharding import Part, build_stream

MediaObjective = Literal["mae", "simmim", "bestrq"]
MODALITY: dict[str, Modality] = {"mae": "image", "simmim": "image", "bestrq": "audio"}


@dataclass(frozen=True, kw_only=True)
class MediaOptions:
    """Settings of the image and audio pipelines beyond `DataConfig` (which gives the source, validation
    split, workers and shuffle)."""

    field: str | None = None  # parquet / hf: column holding the image or audio; None: "image" or "audio"
    label_field: str = "label"  # column holding the class, when there is one
    crop_scale: tuple[float, float] = (
        0.2,
        1.0,
    )  # random resized crop, share of the area (MAE 0.2, SimMIM 0.67)
    flip: bool = True
    mask_patch_size: int = 32  # SimMIM: masked squares, in pixels (a multiple of the model's patch size)
    mask_ratio: float = 0.6  # SimMIM: share of those squares masked
    clip_seconds: float = 2.0  # speech: longer clips are cropped (randomly in training), shorter zero-padded
    class_labels: bool = False  # also yield `class_labels` (B,), -1 where unknown: for probes, not training
    builtin_size: int = 20_000  # samples in the builtin set (both splits)


@dataclass(frozen=True, kw_only=True)
class MediaSampler:
    """One record -> one sample of the objective (picklable, so loader workers may be spawned)."""

    objective: MediaObjective
    model: Any  # ImageModel for mae/simmim, SpeechModel for bestrq
    options: MediaOptions
    train: bool
    _make: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        opts = self.options
        if self.objective == "bestrq":
            clip = round(opts.clip_seconds * self.model.sample_rate)
            object.__setattr__(self, "_make", BestRQ(model=self.model, clip_samples=clip, train=self.train))
            return
        model: ImageModel = self.model
        if opts.mask_patch_size % model.patch_size or model.image_size % opts.mask_patch_size:
            raise DataError(
                f"mask_patch_size={opts.mask_patch_size} must be a multiple of the patch size "
                f"({model.patch_size}) and divide the image size ({model.image_size})"
            )
        augment = ImageAugment(
            size=model.image_size, crop_scale=opts.crop_scale, flip=opts.flip, train=self.train
        )
        object.__setattr__(self, "_make", augment)

    def __call__(self, record: MediaRecord, rng: np.random.Generator) -> dict[str, np.ndarray]:
        if self.objective == "bestrq":
            sample = self._make(decode_audio(record, self.model.sample_rate), rng)
        else:
            model = self.model
            sample = {"pixel_values": self._make(decode_image(record, model.num_channels), rng)}
            grid = model.image_size // model.patch_size
            if self.objective == "mae":
                sample["noise"] = mae_noise(grid * grid, rng)
            else:
                cell = self.options.mask_patch_size // model.patch_size
                sample["bool_masked_pos"] = simmim_mask(grid, cell, self.options.mask_ratio, rng)
        if self.options.class_labels:
            sample["class_labels"] = np.int64(record.label)
        return sample


@dataclass(frozen=True, kw_only=True)
class MediaPlan:
    specs: Sequence[tuple[SourceSpec, float]]
    sampler: MediaSampler
    batch_size: int
    rank: int
    world_size: int
    seed: int
    block: int
    shuffle: bool
    infinite: bool


def _as_record(record: MediaRecord) -> MediaRecord:
    return record


class MediaDataset(IterableDataset):
    """One rank's batches; inside a loader worker, that worker's share of them."""

    def __init__(self, plan: MediaPlan) -> None:
        self.plan = plan
        self._state: dict[str, Any] = {}
        self._resume: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = self._resume = state

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        p = self.plan
        start, self._resume = self._resume or {}, None
        self._state = start
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stream, streams = p.rank * workers + worker, p.world_size * workers
        if start.get("streams", streams) != streams or start.get("stream", stream) != stream:
            raise DataError(
                f"loader state is for stream {start['stream']} of {start['streams']}, "
                f"this is stream {stream} of {streams} (world size or num_workers changed)"
            )
        parts = [
            Part(
                spec.open(stream=stream, num_streams=streams, seed=p.seed + 7919 * i, shuffle=p.shuffle),
                spec.name,
                weight,
                p.seed + 7919 * i,
            )
            for i, (spec, weight) in enumerate(p.specs)
        ]
        records = build_stream(
            parts,
            encode=_as_record,
            stream=stream,
            block=p.block,
            shuffle=p.shuffle,
            infinite=p.infinite,
            state=start.get("records"),
        )
        made = start.get("samples", 0)
        while True:
            samples = []
            for _ in range(p.batch_size):
                try:
                    record = records.next()
                except StopIteration:
                    break
                # each sample's own generator: crops, flips and masks replay exactly after a resume
                samples.append(p.sampler(record, np.random.default_rng([p.seed, stream, made])))
                made += 1
            if not samples:
                return
            self._state = {
                "stream": stream,
                "streams": streams,
                "records": records.state_dict(),
                "samples": made,
            }
            yield {k: np.stack([s[k] for s in samples]) for k in samples[0]}
            if len(samples) < p.batch_size:
                return


def build_media_loader(
    cfg: DataConfig,
    *,
    objective: MediaObjective,
    model: ImageModel | SpeechModel,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    options: MediaOptions | None = None,
    split: Literal["train", "validation"] = "train",
) -> DataPipeline:
    """Batches of `objective` for one rank, from `cfg.source` (`builtin`, a folder or glob of image/audio
    or parquet files, `hf:NAME[:CONFIG]`, or a mixture of them). `model` is the model's config: it gives the
    image size and patch grid, or the sample rate, frame geometry, masking and quantizer settings.

    mae: pixel_values (B, C, H, W), noise (B, N); simmim: pixel_values, bool_masked_pos (B, N);
    bestrq: input_values (B, S), attention_mask (B, S), mask_time_indices (B, T), labels (B, T, K).
    Train is infinite (epochs reshuffled by seed and epoch); validation is one deterministic pass."""
    if objective not in MODALITY:
        raise ValueError(f"objective: {objective!r} is not one of {', '.join(MODALITY)}")
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    if not (isinstance(batch_size, int) and batch_size >= 1 and 0 <= rank < world_size):
        raise ValueError(
            f"build_media_loader: need batch_size >= 1 and 0 <= rank < world_size, got "
            f"batch_size={batch_size}, rank={rank}, world_size={world_size}"
        )
    options = options or MediaOptions()
    train = split == "train"
    specs = _media_specs(cfg, MODALITY[objective], split, options)
    sampler = MediaSampler(objective=objective, model=model, options=options, train=train)
    plan = MediaPlan(
        specs=specs,
        sampler=sampler,
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
        "batch_size": batch_size,
        "rank": rank,
        "world_size": world_size,
        "num_workers": cfg.num_workers,
        "seed": seed,
        "sources": [[spec.name, weight] for spec, weight in specs],
        "shuffle_buffer": cfg.shuffle_buffer,
        "sample": _geometry(objective, model, options),
    }
    return DataPipeline(
        MediaDataset(plan), num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor, meta=meta
    )


def _geometry(objective: str, model: Any, options: MediaOptions) -> list[float]:
    """What fixes a sample's shape and content; resuming with other values is refused."""
    if objective == "bestrq":
        return [model.sample_rate, options.clip_seconds, model.mask_time_prob, model.mask_time_length]
    return [
        model.image_size,
        model.patch_size,
        model.num_channels,
        options.mask_patch_size,
        options.mask_ratio,
    ]


def _media_specs(
    cfg: DataConfig, modality: Modality, split: str, options: MediaOptions
) -> list[tuple[SourceSpec, float]]:
    def resolve(source: str, held_out: float | None, setting: str) -> SourceSpec:
        return resolve_media_source(
            source,
            modality,
            split=split,
            held_out=held_out,
            field=options.field,
            label_field=options.label_field,
            hf_split=cfg.hf_split,
            builtin_size=options.builtin_size,
            setting=setting,
        )

    if split == "validation" and cfg.validation_source is not None:
        return [(resolve(cfg.validation_source, None, "data.validation_source"), 1.0)]
    held_out = cfg.validation_fraction if cfg.validation_source is None else None
    return [(resolve(c.source, held_out, "data.source"), c.weight) for c in cfg.components]


def clip_frames(model: SpeechModel, options: MediaOptions) -> int:
    """Frames in one clip: the second dimension of a bestrq batch's masks and labels."""
    return model.num_frames(round(options.clip_seconds * model.sample_rate))
