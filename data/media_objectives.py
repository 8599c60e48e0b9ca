"""The data side of the image and speech objectives: augmentation, MAE noise, SimMIM masks, span masks and
BEST-RQ's targets, each turning one decoded sample into one fixed-shape training sample.

Every random draw comes from the generator the loader seeds for that sample (seed, stream, sample number),
so a resumed run crops, flips and masks exactly as an uninterrupted one, with no RNG state saved.

BEST-RQ (Chiu et al. 2022, "Self-supervised learning with random-projection quantizer for speech
recognition"): each frame's log-mel features, normalised per utterance (per mel bin, or over all bins), are
projected by a frozen random matrix, L2-normalised and assigned the nearest of a frozen random codebook's
(L2-normalised) entries; the model predicts those indices at masked frames. The frames here are the model's
own (one per `frame_stride` samples, each `receptive_field` samples wide), so targets align with its outputs
exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from data.errors import DataError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
Sample = dict[str, np.ndarray]
IGNORE = -100


class ImageModel(Protocol):
    """What the image objectives read from the model's config."""

    image_size: int
    patch_size: int
    num_channels: int


class SpeechModel(Protocol):
    """What BEST-RQ reads from the model's config (models.config.ConformerConfig has all of it)."""

    sample_rate: int
    frame_stride: int
    receptive_field: int
    mask_time_prob: float
    mask_time_length: int
    vocab_size: int
    num_codebooks: int
    codebook_dim: int
    n_mels: int
    quantizer_seed: int
    quantizer_norm: str

    def num_frames(self, num_samples: int) -> int: ...


# --- images ---------------------------------------------------------------------------------------------


def _resize(image: np.ndarray, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Crop `box` (left, top, right, bottom) and resize it to size x size, bicubic (Pillow)."""
    from PIL import Image

    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC, box=box))
    return out[..., None] if squeeze else out


def random_resized_crop(
    image: np.ndarray, size: int, scale: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """A random crop of `scale` of the area with an aspect ratio in [3/4, 4/3], resized to size x size
    (torchvision's RandomResizedCrop; after 10 misses, the whole image)."""
    h, w = image.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return _resize(image, size, (left, top, left + cw, top + ch))
    return _resize(image, size, (0, 0, w, h))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central square, resized to size x size (evaluation: no randomness)."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return _resize(image, size, (left, top, left + side, top + side))


def to_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 -> (C, H, W) float32 normalised: ImageNet's mean and std for RGB, 0.5 / 0.5 for gray."""
    x = image.astype(np.float32) / 255.0
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if image.shape[-1] == 3 else (0.5, 0.5)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))


@dataclass(frozen=True, kw_only=True)
class ImageAugment:
    """Train: random resized crop + horizontal flip; evaluation: the central square, resized."""

    size: int
    crop_scale: tuple[float, float] = (0.2, 1.0)
    flip: bool = True
    train: bool = True

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not self.train:
            return to_pixels(center_crop(image, self.size))
        image = random_resized_crop(image, self.size, self.crop_scale, rng)
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return to_pixels(image)


def mae_noise(num_patches: int, rng: np.random.Generator) -> np.ndarray:
    """MAE's per-patch scores (the model keeps the lowest share): uniform in [0, 1)."""
    return rng.random(num_patches, dtype=np.float32)


def simmim_mask(grid: int, cell: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """SimMIM's mask over a grid x grid patch grid, (grid**2,) bool: ceil(ratio * cells) of the
    (grid / cell)**2 squares of cell x cell patches are masked whole."""
    if grid % cell:
        raise DataError(f"the mask patch ({cell} patches) does not divide the patch grid ({grid} patches)")
    side = grid // cell
    masked = np.zeros(side * side, dtype=bool)
    masked[rng.permutation(side * side)[: math.ceil(side * side * ratio)]] = True
    return masked.reshape(side, side).repeat(cell, 0).repeat(cell, 1).reshape(-1)


# --- speech ---------------------------------------------------------------------------------------------


def spans_to_mask(starts: np.ndarray, length: int, num_frames: int) -> np.ndarray:
    """(num_frames,) bool, True on [start, start + length) for every start (clipped at the end)."""
    mask = np.zeros(num_frames, dtype=bool)
    for start in starts:
        mask[start : start + length] = True
    return mask


def span_mask(
    num_frames: int, valid: int, prob: float, length: int, rng: np.random.Generator, min_spans: int = 2
) -> np.ndarray:
    """wav2vec 2.0's masking: about prob * valid / length spans of `length` frames (at least `min_spans`),
    distinct starts drawn among the first `valid` (unpadded) frames; overlaps merge."""
    starts_possible = valid - length + 1
    if starts_possible < 1:
        return np.zeros(num_frames, dtype=bool)
    spans = max(int(prob * valid / length + rng.random()), min_spans)
    spans = min(spans, starts_possible)
    return spans_to_mask(rng.choice(starts_possible, spans, replace=False), length, num_frames)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters equally spaced on the HTK mel scale from 0 to Nyquist."""
    mel = np.linspace(0.0, 2595.0 * np.log10(1.0 + sample_rate / 2 / 700.0), n_mels + 2)
    hz = 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lower, center, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    rising = (bins[None] - lower) / (center - lower)
    falling = (upper - bins[None]) / (upper - center)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class RandomProjectionQuantizer:
    """BEST-RQ's frozen quantizer: log-mel frame -> per-utterance normalisation -> random projection ->
    nearest codebook entry (cosine), per codebook. Everything is derived from `seed`: no state to save."""

    sample_rate: int
    frame_stride: int
    window: int
    n_mels: int
    codebook_dim: int
    codebook_size: int
    num_codebooks: int = 1
    seed: int = 0
    norm: str = "bin"  # "bin": per mel bin over time; "utterance": one mean and std over all bins
    _mel: np.ndarray = field(init=False, repr=False, compare=False)
    _projection: np.ndarray = field(init=False, repr=False, compare=False)
    _codebook: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng([self.seed, 0xBE57])
        k, m, d, v = self.num_codebooks, self.n_mels, self.codebook_dim, self.codebook_size
        projection = rng.normal(0.0, math.sqrt(2.0 / (m + d)), (k, m, d))  # Xavier-normal, as in BEST-RQ
        codebook = rng.normal(0.0, 1.0, (k, v, d))
        codebook /= np.linalg.norm(codebook, axis=-1, keepdims=True)
        object.__setattr__(self, "_mel", mel_filterbank(m, self.window, self.sample_rate))
        object.__setattr__(self, "_projection", projection.astype(np.float32))
        object.__setattr__(self, "_codebook", codebook.astype(np.float32))

    @classmethod
    def for_model(cls, model: SpeechModel) -> RandomProjectionQuantizer:
        return cls(
            sample_rate=model.sample_rate,
            frame_stride=model.frame_stride,
            window=model.receptive_field,
            n_mels=model.n_mels,
            codebook_dim=model.codebook_dim,
            codebook_size=model.vocab_size,
            num_codebooks=model.num_codebooks,
            seed=model.quantizer_seed,
            norm=model.quantizer_norm,
        )

    def log_mel(self, audio: np.ndarray, num_frames: int) -> np.ndarray:
        """(num_frames, n_mels): frame t is samples [t * stride, t * stride + window), Hann-windowed."""
        index = np.arange(num_frames)[:, None] * self.frame_stride + np.arange(self.window)[None]
        frames = audio[index] * np.hanning(self.window).astype(np.float32)
        power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
        return np.log(power @ self._mel.T + 1e-6).astype(np.float32)

    def codes(self, features: np.ndarray, valid: int) -> np.ndarray:
        """(T, num_codebooks) int64 codebook indices of (T, n_mels) features; the first `valid` frames set the
        per-utterance normalisation (per mel bin, or over all bins: `norm`)."""
        ref = features[: max(valid, 1)]
        axis = 0 if self.norm == "bin" else None
        x = (features - ref.mean(axis)) / (ref.std(axis) + 1e-5)
        z = np.einsum("tm,kmd->tkd", x, self._projection)
        z /= np.linalg.norm(z, axis=-1, keepdims=True) + 1e-12
        return np.einsum("tkd,kvd->tkv", z, self._codebook).argmax(-1).astype(np.int64)

    def __call__(self, audio: np.ndarray, num_frames: int, valid: int) -> np.ndarray:
        return self.codes(self.log_mel(audio, num_frames), valid)


@dataclass(frozen=True, kw_only=True)
class BestRQ:
    """One clip -> a fixed-length BEST-RQ sample: crop (random in training) or zero-pad to `clip_samples`,
    normalise to zero mean and unit variance over the real samples (wav2vec 2.0's input normalisation),
    mask spans of frames, and label the masked frames with the quantizer's codes (-100 elsewhere)."""

    model: SpeechModel
    clip_samples: int
    train: bool = True
    quantizer: RandomProjectionQuantizer = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.model.num_frames(self.clip_samples) < self.model.mask_time_length:
            raise DataError(
                f"a clip of {self.clip_samples} samples makes fewer frames than one masked span "
                f"({self.model.mask_time_length}); make the clips longer"
            )
        object.__setattr__(self, "quantizer", RandomProjectionQuantizer.for_model(self.model))

    def __call__(self, audio: np.ndarray, rng: np.random.Generator) -> Sample:
        n = self.clip_samples
        if len(audio) > n:
            start = int(rng.integers(0, len(audio) - n + 1)) if self.train else 0
            audio = audio[start : start + n]
        length = len(audio)
        audio = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
        values = np.zeros(n, dtype=np.float32)
        values[:length] = audio
        frames, valid = self.model.num_frames(n), self.model.num_frames(length)
        masked = span_mask(frames, valid, self.model.mask_time_prob, self.model.mask_time_length, rng)
        labels = self.quantizer(values, frames, valid)
        labels[~masked] = IGNORE
        return {
            "input_values": values,
            "attention_mask": (np.arange(n) < length).astype(np.int64),
            "mask_time_indices": masked,
            "labels": labels,
        }
