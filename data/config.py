"""Typed configuration of the data pipeline (the `data:` section of a run config)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

ObjectiveName = Literal["clm", "mlm", "span"]  # causal LM (GPT), masked LM (BERT), span corruption (T5)
OBJECTIVES: tuple[str, ...] = typing.get_args(ObjectiveName)
# masked autoencoding (ViT MAE), masked image modeling (SimMIM: ViT, Swin), BEST-RQ (Conformer)
MediaObjectiveName = Literal["mae", "simmim", "bestrq"]
Modality = Literal["image", "audio"]
MEDIA_MODALITY: dict[str, Modality] = {"mae": "image", "simmim": "image", "bestrq": "audio"}
# The fields of DataConfig that only some objectives read (the others apply to every objective).
_TEXT = ("clm", "mlm", "span")
FIELD_OBJECTIVES: dict[str, tuple[str, ...]] = {
    "seq_len": _TEXT, "tokenizer": _TEXT, "vocab_size": _TEXT, "tokenizer_train_chars": _TEXT,
    "text_field": _TEXT, "text_unit": _TEXT, "mlm_probability": ("mlm",), "noise_density": ("span",),
    "mean_noise_span_length": ("span",), "media_field": ("mae", "simmim", "bestrq"),
    "crop_scale": ("mae", "simmim"), "image_flip": ("mae", "simmim"), "mask_patch_size": ("simmim",),
    "mask_ratio": ("simmim",), "clip_seconds": ("bestrq",), "prepared_image_size": ("mae", "simmim"),
}  # fmt: skip
TextUnit = Literal["file", "paragraph", "line"]
TEXT_UNITS = ("file", "paragraph", "line")


def _doc(text: str, default: Any) -> Any:
    """A field documented where it is declared (`pretrain config` prints the text)."""
    return field(default=default, metadata={"doc": text})


@dataclass(frozen=True, kw_only=True)
class MixtureComponent:
    """One source of a weighted mixture; documents are drawn from it with probability ~ weight."""

    source: str
    weight: float = 1.0


@dataclass(kw_only=True)
class DataConfig:
    """Where text, images or audio come from and how they become batches ("builtin": the Python standard
    library's sources for text, procedurally generated labelled images or clips for the media families)."""

    __pydantic_config__ = {"extra": "forbid"}  # validated by pydantic from a run config: no unknown keys

    source: str | list[MixtureComponent] = _doc(
        "builtin, a path glob of .txt/.jsonl/.json/.parquet (optionally .gz/.zst), a prepared-shards "
        "directory, hf:NAME[:CONFIG], or a list of {source, weight}; images and speech: builtin (generated "
        "labelled images or clips), a folder or glob of image or wav/flac/ogg/mp3 files (a folder's "
        "subfolders are classes) or .parquet, or hf:NAME[:CONFIG] with an image/audio column",
        "builtin",
    )
    seq_len: int = _doc("tokens per training sequence", 128)
    tokenizer: str | None = _doc("null: train a byte-level BPE on the source; else a path or hub name", None)
    vocab_size: int = _doc("size of the tokenizer trained when data.tokenizer is null", 8192)
    tokenizer_train_chars: int = _doc(
        "characters the tokenizer trains on (a bounded sample: seconds)", 2_000_000
    )
    text_field: str = _doc("JSON key / parquet column / HF column holding the text", "text")
    text_unit: TextUnit = _doc(f"what one document is in a .txt file: {', '.join(TEXT_UNITS)}", "paragraph")
    max_record_bytes: int = _doc("longer records (lines, paragraphs, files) are skipped and counted", 8 << 20)
    num_workers: int = _doc("loader worker processes per rank", 1)
    prefetch_factor: int = _doc("batches each worker prepares ahead", 4)
    shuffle: bool = _doc("shuffle documents within blocks of shuffle_buffer", True)
    shuffle_buffer: int = _doc("documents per shuffle block (also bounds the re-read on resume)", 1024)
    validation_source: str | None = _doc("null: split validation_fraction of the source off", None)
    validation_fraction: float = _doc("share of documents held out for validation", 0.05)
    hf_split: str = _doc("split of an hf: source", "train")
    mlm_probability: float = _doc("MLM (BERT): share of tokens masked", 0.15)
    noise_density: float = _doc("span corruption (T5): share of tokens corrupted", 0.15)
    mean_noise_span_length: float = _doc("span corruption (T5): mean corrupted span length", 3.0)
    media_field: str | None = _doc(
        "images, speech: parquet / hf: column holding the image or audio; null = 'image' or 'audio'", None
    )
    crop_scale: tuple[float, float] | None = _doc(
        "images: random resized crop, share of the area; null = the objective's (MAE 0.2-1, SimMIM 0.67-1)",
        None,
    )
    image_flip: bool = _doc("images: random horizontal flips in training", True)
    mask_patch_size: int | None = _doc(
        "SimMIM: side of the masked squares in pixels (a multiple of the patch size dividing the image); "
        "null = 32, or a quarter of the image side when 32 leaves fewer than 4 squares across",
        None,
    )
    mask_ratio: float = _doc("SimMIM: share of those squares masked", 0.6)
    clip_seconds: float = _doc(
        "speech: seconds per sample (longer clips are cropped, randomly in training; shorter zero-padded)",
        2.0,
    )
    prepared_image_size: int | None = _doc(
        "images, `pretrain data prepare`: the shorter side images are resized to before they are stored "
        "(training crops from them); null = ceil(model image size x 256 / 224), ImageNet's 256 for 224",
        None,
    )
    virtual_streams: int | None = field(
        default=None,
        metadata={
            "doc": "virtual data streams V: the data order depends on V alone, not on the number of "
            "processes or loader workers, so a run resumes at another world size with the same data. "
            "None: world x grad_accum x num_workers of the first run (any world size dividing the global "
            "batch then resumes with the same num_workers); a checkpoint's V is kept on resume. Each must be "
            "a multiple of world x grad_accum x num_workers / gcd(grad_accum, num_workers)."
        },
    )
    allow_changed: bool = field(
        default=False,
        metadata={
            "doc": "resume even if the data changed since the checkpoint (files added, removed or "
            "rewritten; another prepared index or hf: dataset), with a warning instead of an error. Saved "
            "positions are kept as they are, so the rest of the current epoch may repeat or skip documents "
            "(data/fingerprint.py)."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.source, list):
            self.source = [_component(c) for c in self.source]
            if not self.source:
                raise ValueError("data.source: an empty mixture list; give at least one {source, weight}")
        elif not isinstance(self.source, str) or not self.source:
            raise ValueError(
                f"data.source: expected a string or a list of {{source, weight}}, got {self.source!r}"
            )
        _check_int("seq_len", self.seq_len, 8)
        _check_int("vocab_size", self.vocab_size, 384)
        _check_int("tokenizer_train_chars", self.tokenizer_train_chars, 1000)
        _check_int("max_record_bytes", self.max_record_bytes, 1)
        _check_int("num_workers", self.num_workers, 0)
        _check_int("prefetch_factor", self.prefetch_factor, 1)
        _check_int("shuffle_buffer", self.shuffle_buffer, 1)
        if self.virtual_streams is not None:
            _check_int("virtual_streams", self.virtual_streams, 1)
        if self.text_unit not in TEXT_UNITS:
            raise ValueError(f"data.text_unit: {self.text_unit!r} is not one of {', '.join(TEXT_UNITS)}")
        for name in ("validation_fraction", "mlm_probability", "noise_density"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise ValueError(f"data.{name}: expected a number in [0, 1), got {value!r}")
        if self.prepared_image_size is not None:
            _check_int("prepared_image_size", self.prepared_image_size, 1)
        if self.mask_patch_size is not None:
            _check_int("mask_patch_size", self.mask_patch_size, 1)
        if not isinstance(self.mask_ratio, int | float) or not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"data.mask_ratio: expected a number in (0, 1), got {self.mask_ratio!r}")
        if not isinstance(self.clip_seconds, int | float) or not self.clip_seconds > 0:
            raise ValueError(f"data.clip_seconds: expected a number > 0, got {self.clip_seconds!r}")
        if self.crop_scale is not None:
            low, high = self.crop_scale
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(
                    f"data.crop_scale: expected 0 < low <= high <= 1, got {list(self.crop_scale)}"
                )
        if not self.mean_noise_span_length >= 1.0:
            raise ValueError(
                f"data.mean_noise_span_length: expected >= 1, got {self.mean_noise_span_length!r}"
            )

    def unused_settings(self, objective: str) -> list[str]:
        """Fields set to other than their default that `objective` does not read (a text setting in an image
        run, say): a run refuses them rather than ignore them."""
        defaults = DataConfig()
        return [
            name
            for name, users in FIELD_OBJECTIVES.items()
            if objective not in users and getattr(self, name) != getattr(defaults, name)
        ]

    @property
    def components(self) -> list[MixtureComponent]:
        """The source as a mixture (a single source is a mixture of one)."""
        if isinstance(self.source, str):
            return [MixtureComponent(source=self.source)]
        return list(self.source)


def _component(item: Any) -> MixtureComponent:
    if isinstance(item, MixtureComponent):
        component = item
    elif isinstance(item, dict) and set(item) <= {"source", "weight"} and "source" in item:
        component = MixtureComponent(**item)
    else:
        raise ValueError(
            f"data.source: mixture entries must be {{source: STR, weight: NUMBER}}, got {item!r}"
        )
    if not isinstance(component.source, str) or not (
        isinstance(component.weight, int | float) and component.weight > 0
    ):
        raise ValueError(f"data.source: bad mixture entry {item!r} (source must be a string, weight > 0)")
    return component


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"data.{name}: expected an integer >= {minimum}, got {value!r}")
