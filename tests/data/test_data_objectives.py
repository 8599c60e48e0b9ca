"""Packing boundaries, MLM statistics, T5 span corruption shapes and reconstruction."""

from __future__ import annotations

import numpy as np
import pytest

from data.objectives import (
    IGNORE,
    MaskedLM,
    SpanCorruption,
    compute_input_and_target_lengths,
    random_spans_noise_mask,
)
from data.packing import Packer


class ListDocs:
    """A finite document stream over given arrays (the interface Packer consumes)."""

    def __init__(self, docs, state=None):
        self.docs, self.i = docs, (state or {"i": 0})["i"]

    def state_dict(self):
        return {"i": self.i}

    def next(self):
        if self.i == len(self.docs):
            raise StopIteration
        self.i += 1
        return self.docs[self.i - 1]


def random_docs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(10, 500, size=int(rng.integers(1, 30))) for _ in range(n)]


def drain(packer):
    chunks = []
    while True:
        try:
            chunks.append(packer.next())
        except StopIteration:
            return chunks


def test_packing_separates_documents_and_loses_nothing():
    docs = random_docs()
    chunks = drain(Packer(lambda s: ListDocs(docs, s), length=16, sep_id=0))
    stream = np.concatenate([np.append(d, 0) for d in docs])
    assert all(len(c) == 16 for c in chunks)
    assert np.array_equal(np.concatenate(chunks), stream[: len(chunks) * 16])  # every token, in order
    assert len(stream) - len(chunks) * 16 < 16  # only the final partial chunk is not emitted


def test_packer_resumes_from_its_state_mid_document():
    docs = random_docs(seed=1)
    packer = Packer(lambda s: ListDocs(docs, s), length=16, sep_id=0)
    for _ in range(7):
        packer.next()
    state = packer.state_dict()
    assert state["offset"] > 0  # the next chunk starts inside a document
    rest = drain(packer)
    resumed = drain(Packer(lambda s: ListDocs(docs, s), length=16, sep_id=0, state=state))
    assert len(rest) == len(resumed) > 0 and all(np.array_equal(a, b) for a, b in zip(rest, resumed))


def test_t5_lengths_match_the_reference():
    assert compute_input_and_target_lengths(512, 0.15, 3.0) == (568, 114)  # as in HF's run_t5_mlm_flax
    assert compute_input_and_target_lengths(32, 0.15, 3.0) == (34, 8)


@pytest.mark.parametrize(
    ("inputs", "density", "expected"),
    [
        # 141 raw tokens: 21 noise in 7 spans -> inputs 141 - 21 + 7 + 1 = 128, targets 21 + 7 + 1 = 29;
        # 142 would make 129 inputs.
        (128, 0.15, (141, 29)),
        # 159: 48 noise (47.7 rounded) in 16 spans -> inputs 159 - 48 + 17 = 128, targets 48 + 17 = 65.
        (128, 0.3, (159, 65)),
        # 191: 96 noise (95.5 to even) in 32 spans -> inputs 128, targets 129 > 128, so one token fewer:
        # 190: 95 noise in 32 spans (31.7) -> inputs 190 - 95 + 33 = 128, targets 95 + 33 = 128.
        (128, 0.5, (190, 128)),
        # 767: 384 noise (383.5 to even), 128 spans -> inputs 512, targets 513; 766: 383 noise, 128 spans
        # (127.7) -> targets 383 + 129 = 512.
        (512, 0.5, (766, 512)),
        # 212: 127 noise (127.2) in 42 spans (42.3) -> inputs 212 - 127 + 43 = 128, targets 127 + 43 = 170;
        # 213: 128 noise in 43 spans -> 129 inputs.
        (128, 0.6, (212, 170)),
        # T5's helper says (14, 11) here: 15 raw tokens make 11 inputs and 12 targets, so one fewer; but 14
        # make 7 noise in 2 spans, i.e. 10 targets (and 10 inputs, padded to 11), not 11.
        (11, 0.5, (14, 10)),
    ],
)
def test_t5_lengths_by_hand(inputs, density, expected):
    tokens, targets = compute_input_and_target_lengths(inputs, density, 3.0)
    assert (tokens, targets) == expected
    span = SpanCorruption(
        seq_len=inputs, eos_id=1, pad_id=0, sentinel_ids=tuple(range(1000, 1200)), noise_density=density
    )
    sample = span(np.arange(10, 10 + tokens), np.random.default_rng(0))  # what the samples really are
    assert len(sample["input_ids"]) == inputs and len(sample["labels"]) == targets


def test_noise_mask_density_and_spans():
    rng = np.random.default_rng(0)
    mask = random_spans_noise_mask(568, 0.15, 3.0, rng)
    assert mask.sum() == 85 and len(mask) == 568 and not mask[0]
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    assert starts.sum() == 28  # round(85 / 3)


@pytest.mark.parametrize("seq_len", [32, 128, 512])
def test_span_corruption_shapes_and_reconstruction(seq_len):
    sentinels = tuple(range(1000, 1100))
    span = SpanCorruption(seq_len=seq_len, eos_id=1, pad_id=0, sentinel_ids=sentinels)
    rng = np.random.default_rng(seq_len)
    for _ in range(20):
        chunk = rng.integers(10, 900, size=span.chunk_len)
        sample = span(chunk, rng)
        inputs, targets = sample["input_ids"], sample["labels"]
        assert inputs.shape == (seq_len,) and targets.shape == (span.targets_length,)
        assert inputs[-1] == targets[-1] == 1 and sample["attention_mask"].all()
        # put every target span back in place of its sentinel: the original chunk again
        spans, current = {}, None
        for t in targets[:-1]:
            if t in sentinels:
                current = spans.setdefault(int(t), [])
            else:
                current.append(int(t))
        rebuilt = [tok for t in inputs[:-1] for tok in (spans[int(t)] if t in sentinels else [int(t)])]
        assert rebuilt == chunk.tolist()
        assert [t for t in inputs if t in sentinels] == list(
            sentinels[: len(spans)]
        )  # in order, from extra_id_0


def test_span_corruption_refuses_more_spans_than_sentinels():
    with pytest.raises(ValueError, match="sentinels"):
        SpanCorruption(seq_len=4096, eos_id=1, pad_id=0, sentinel_ids=tuple(range(1000, 1100)))


def test_mlm_statistics_and_segments():
    special = (0, 1, 2, 3, 4)  # pad, unk, cls, sep, mask
    mlm = MaskedLM(seq_len=128, cls_id=2, sep_id=3, mask_id=4, special_ids=special, vocab_size=1000)
    rng = np.random.default_rng(0)
    chosen = masked = randomised = kept = maskable = 0
    for _ in range(400):  # ~50k tokens
        chunk = rng.integers(5, 1000, size=mlm.chunk_len)
        s = mlm(chunk, rng)
        ids, types, labels = s["input_ids"], s["token_type_ids"], s["labels"]
        assert ids.shape == types.shape == labels.shape == (128,)
        assert ids[0] == 2 and ids[-1] == 3 and (ids == 3).sum() + (labels == 3).sum() == 2
        split = int(np.flatnonzero(types)[0])  # [CLS] A [SEP] | B [SEP]
        assert ids[split - 1] == 3 and types[:split].sum() == 0 and types[split:].all()
        original = np.concatenate([[2], chunk[: split - 2], [3], chunk[split - 2 :], [3]])
        sel = labels != IGNORE
        assert np.array_equal(labels[sel], original[sel]) and np.array_equal(ids[~sel], original[~sel])
        maskable += 125
        chosen += sel.sum()
        masked += (ids[sel] == 4).sum()
        kept += (ids[sel] == original[sel]).sum()
        randomised += ((ids[sel] != 4) & (ids[sel] != original[sel])).sum()
    assert abs(chosen / maskable - 0.15) < 0.01
    assert abs(masked / chosen - 0.8) < 0.02
    assert abs(kept / chosen - 0.1) < 0.015  # includes the rare random pick of the same token
    assert abs(randomised / chosen - 0.1) < 0.015
