"""The three pretraining objectives, each turning one packed chunk into one fixed-shape sample.

Randomness comes from a generator the loader seeds per batch (seed, stream, sample number), so a
resumed run masks exactly as an uninterrupted one without saving any RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from data.errors import DataError

Sample = dict[str, np.ndarray]
IGNORE = -100


@dataclass(frozen=True, kw_only=True)
class CausalLM:
    """GPT: chunks of seq_len tokens with EOS between documents; labels = input_ids (the model shifts)."""

    seq_len: int
    eos_id: int
    random: ClassVar[bool] = False
    rng_per_sample: ClassVar[bool] = False  # one generator per micro-batch

    @property
    def chunk_len(self) -> int:
        return self.seq_len

    @property
    def sep_id(self) -> int:
        return self.eos_id

    def __call__(self, chunk: np.ndarray, rng: np.random.Generator | None) -> Sample:
        return {"input_ids": chunk, "labels": chunk}


@dataclass(frozen=True, kw_only=True)
class MaskedLM:
    """BERT: [CLS] A [SEP] B [SEP] filling seq_len exactly; 15% of the non-special tokens predicted, of those
    80% replaced by [MASK], 10% by a random token, 10% kept."""

    seq_len: int
    cls_id: int
    sep_id: int
    mask_id: int
    special_ids: tuple[int, ...]
    vocab_size: int
    probability: float = 0.15
    random: ClassVar[bool] = True
    rng_per_sample: ClassVar[bool] = False  # one generator per micro-batch
    _normal_ids: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        normal = np.setdiff1d(np.arange(self.vocab_size), np.asarray(self.special_ids))
        object.__setattr__(self, "_normal_ids", normal)

    @property
    def chunk_len(self) -> int:
        return self.seq_len - 3

    def __call__(self, chunk: np.ndarray, rng: np.random.Generator) -> Sample:
        split = int(rng.integers(1, len(chunk)))  # segment A = chunk[:split], B = the rest
        ids = np.concatenate([[self.cls_id], chunk[:split], [self.sep_id], chunk[split:], [self.sep_id]])
        token_types = np.zeros_like(ids)
        token_types[split + 2 :] = 1
        maskable = ~np.isin(ids, self.special_ids)
        chosen = (rng.random(len(ids)) < self.probability) & maskable
        labels = np.where(chosen, ids, IGNORE)
        action = rng.random(len(ids))
        to_mask, to_random = chosen & (action < 0.8), chosen & (action >= 0.8) & (action < 0.9)
        ids = np.where(to_mask, self.mask_id, ids)
        ids[to_random] = rng.choice(self._normal_ids, size=int(to_random.sum()))
        return {
            "input_ids": ids,
            "token_type_ids": token_types,
            "attention_mask": np.ones_like(ids),
            "labels": labels,
        }


def _lengths_for(tokens_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(inputs length, targets length) after corrupting `tokens_length` tokens, counted as
    `random_spans_noise_mask` corrupts them: non-noise tokens + one sentinel per span + EOS, and noise
    tokens + one sentinel per span + EOS."""
    num_noise = int(round(tokens_length * noise_density))
    num_noise = min(max(num_noise, 1), tokens_length - 1)
    num_spans = max(int(round(num_noise / mean_span)), 1)
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def compute_input_and_target_lengths(
    inputs_length: int, noise_density: float, mean_span: float
) -> tuple[int, int]:
    """The raw tokens per sample, and the targets length, such that the inputs fit `inputs_length`.

    T5's `random_spans_helper` (which HF's run_t5_mlm_flax copies): the largest raw length whose corrupted
    inputs still fit; at noise density 0.5, one raw token fewer when the targets would come out longer than
    the inputs (T5 does this so that the targets length is the inputs', usually a round number). Where
    T5's helper disagrees with the samples its own noise mask makes, this follows the samples, so that
    `targets_length` is the length every sample's targets have:
    - the noise and span counts are clamped as the mask clamps them (at least one noise token, one
      non-noise token, one span), where T5's helper counts zero spans for samples with fewer noise
      tokens than half a mean span;
    - after the density-0.5 shortening, the targets length is that of the shorter sample, where T5
      subtracts one: for 11 inputs, spans of 3, T5 says (14, 11), and 14 raw tokens make 10 targets.
    """
    tokens_length = inputs_length
    while _lengths_for(tokens_length + 1, noise_density, mean_span)[0] <= inputs_length:
        tokens_length += 1
    inputs, targets = _lengths_for(tokens_length, noise_density, mean_span)
    if noise_density == 0.5 and targets > inputs:
        tokens_length -= 1
        _, targets = _lengths_for(tokens_length, noise_density, mean_span)
    return tokens_length, targets


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span: float, rng: np.random.Generator
) -> np.ndarray:
    """A bool mask with round(length * density) noise tokens in round(noise / mean_span) spans (T5's)."""
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span)), 1)

    def segment_lengths(items: int) -> np.ndarray:  # `items` split at num_spans - 1 random places
        cuts = np.sort(rng.choice(np.arange(1, items), size=num_spans - 1, replace=False))
        return np.diff(np.concatenate([[0], cuts, [items]]))

    spans = np.stack([segment_lengths(length - num_noise), segment_lengths(num_noise)], axis=1).reshape(-1)
    is_noise = np.repeat(np.tile([False, True], num_spans), spans)
    return is_noise


@dataclass(frozen=True, kw_only=True)
class SpanCorruption:
    """T5: noise spans replaced by sentinels in the inputs; the targets list each sentinel and its span."""

    seq_len: int  # inputs length
    eos_id: int
    pad_id: int
    sentinel_ids: tuple[int, ...]  # <extra_id_0>, <extra_id_1>, ...
    noise_density: float = 0.15
    mean_span: float = 3.0
    random: ClassVar[bool] = True
    rng_per_sample: ClassVar[bool] = False  # one generator per micro-batch
    tokens_length: int = field(init=False)
    targets_length: int = field(init=False)

    def __post_init__(self) -> None:
        tokens, targets = compute_input_and_target_lengths(self.seq_len, self.noise_density, self.mean_span)
        object.__setattr__(self, "tokens_length", tokens)
        object.__setattr__(self, "targets_length", targets)
        spans = targets - (min(max(int(round(tokens * self.noise_density)), 1), tokens - 1)) - 1
        if spans > len(self.sentinel_ids):
            raise DataError(
                f"data.seq_len: {self.seq_len} needs {spans} sentinels per sample, the tokenizer has "
                f"{len(self.sentinel_ids)}; use a shorter seq_len or a lower noise_density"
            )

    @property
    def chunk_len(self) -> int:
        return self.tokens_length

    @property
    def sep_id(self) -> int:
        return self.eos_id

    def __call__(self, chunk: np.ndarray, rng: np.random.Generator) -> Sample:
        noise = random_spans_noise_mask(len(chunk), self.noise_density, self.mean_span, rng)
        starts = noise & ~np.concatenate([[False], noise[:-1]])
        sentinels = np.asarray(self.sentinel_ids[: int(starts.sum())])
        kept_before = np.cumsum(~noise)[starts]  # non-noise tokens before each span
        inputs = np.insert(chunk[~noise], kept_before, sentinels)
        targets = np.insert(chunk[noise], np.flatnonzero(starts[noise]), sentinels)
        inputs = np.concatenate([inputs, [self.eos_id]])
        targets = np.concatenate([targets, [self.eos_id]])
        attention = np.ones(self.seq_len, dtype=np.int64)
        if len(inputs) < self.seq_len:  # the formula can land one short: pad to the fixed shape
            attention[len(inputs) :] = 0
            inputs = np.concatenate([inputs, np.full(self.seq_len - len(inputs), self.pad_id)])
        return {"input_ids": inputs, "attention_mask": attention, "labels": targets}
