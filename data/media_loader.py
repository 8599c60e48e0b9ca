"""The resumable loader for images and audio: media sources -> virtual streams -> decode, augment and mask,
seeded per sample -> micro-batches.

It is text's loader (data/loader.py `build_pipeline`) with another objective: the same virtual streams and
their layout over ranks and workers (data/layout.py), sharding rule, seeded shuffle blocks, mixtures,
per-virtual-stream state, `merge_states` / `plan_resume` for another world size, and settings-checked
resume. There is no tokenizer and no packing: one record is one sample (`data.packing.Unpacked`), and a
virtual stream's state is its record stream's cursor plus how many samples it has made, which seeds the
next one's crop, flip and mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from data.config import MEDIA_MODALITY, DataConfig, MediaObjectiveName
from data.errors import DataError
from data.loader import DataPipeline, build_pipeline, check_loader_args
from data.media import (
    MediaRecord,
    Modality,
    check_prepared,
    decode_audio,
    decode_image,
    resolve_media_source,
)
from data.media_objectives import BestRQ, ImageAugment, ImageModel, SpeechModel, mae_noise, simmim_mask
from data.records import SourceSpec

MediaObjective = MediaObjectiveName
MODALITY: dict[str, Modality] = MEDIA_MODALITY
CROP_SCALE = {"mae": (0.2, 1.0), "simmim": (0.67, 1.0)}  # MAE's and SimMIM's published augmentation


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
    """One record -> one sample of the objective (picklable, so loader workers may be spawned): the
    `data.loader.Objective` of image and audio virtual streams."""

    objective: MediaObjective
    model: Any  # ImageModel for mae/simmim, SpeechModel for bestrq
    options: MediaOptions
    train: bool
    _make: Any = field(init=False, repr=False, compare=False)
    random: ClassVar[bool] = True
    rng_per_sample: ClassVar[bool] = True  # a sample's crop and mask depend on its position alone
    chunk_len: ClassVar[None] = None  # no packing: one record, one sample
    sep_id: ClassVar[int] = -1

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

    def __call__(self, record: MediaRecord, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        assert rng is not None  # random: the loader always passes one
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


def media_options(cfg: DataConfig, objective: MediaObjective, model: Any) -> MediaOptions:
    """The `data:` section's image and speech settings as the pipeline takes them (a run's defaults resolved)."""
    if objective == "bestrq":
        return MediaOptions(field=cfg.media_field, clip_seconds=cfg.clip_seconds)
    mask_patch = cfg.mask_patch_size
    if mask_patch is None:
        mask_patch = 32 if model.image_size // 32 >= 4 else max(model.image_size // 4, model.patch_size)
    return MediaOptions(
        field=cfg.media_field,
        crop_scale=cfg.crop_scale or CROP_SCALE[objective],
        flip=cfg.image_flip,
        mask_patch_size=mask_patch,
        mask_ratio=cfg.mask_ratio,
    )


def _as_record(record: MediaRecord) -> MediaRecord:
    """Records stay encoded in the shuffle block; they are decoded when their micro-batch is made."""
    return record


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
    grad_accum: int = 1,
) -> DataPipeline:
    """Batches of `objective` for one rank, from `cfg.source` (`builtin`, a folder or glob of image/audio
    or parquet files, `hf:NAME[:CONFIG]`, a directory of decoded shards from `pretrain data prepare`, or a
    mixture of them). `model` is the model's config: it gives the
    image size and patch grid, or the sample rate, frame geometry, masking and quantizer settings.

    mae: pixel_values (B, C, H, W), noise (B, N); simmim: pixel_values, bool_masked_pos (B, N);
    bestrq: input_values (B, S), attention_mask (B, S), mask_time_indices (B, T), labels (B, T, K).
    Like `data.build_loader`: the rank draws `grad_accum` micro-batches per optimizer step (the global
    order depends on it); train is infinite (epochs reshuffled by seed and epoch) over
    `data.virtual_streams` virtual streams; validation is one deterministic pass."""
    check_loader_args(
        "build_media_loader", objective, list(MODALITY), split=split, batch_size=batch_size, rank=rank,
        world_size=world_size, grad_accum=grad_accum,
    )  # fmt: skip
    options = options or MediaOptions()
    train = split == "train"
    specs = _media_specs(cfg, MODALITY[objective], split, options)
    for spec, _ in specs:
        check_prepared(spec, model)
    sampler = MediaSampler(objective=objective, model=model, options=options, train=train)
    meta = {
        "objective": objective,
        "split": split,
        "batch_size": batch_size,
        "seed": seed,
        "sources": [[spec.name, weight] for spec, weight in specs],
        "shuffle": cfg.shuffle,
        "shuffle_buffer": cfg.shuffle_buffer,
        "sample": _geometry(objective, model, options),
    }
    return build_pipeline(
        cfg,
        specs=specs,
        objective=sampler,
        encode=_as_record,
        meta=meta,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        split=split,
        grad_accum=grad_accum,
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
