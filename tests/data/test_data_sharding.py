"""Every document goes to exactly one (rank, worker) stream per epoch; shuffling is seeded."""

from __future__ import annotations

import pytest

from data.sharding import DocStream, Mixture
from data.sources import resolve_source
from data.tokenizer import Encoder


def epoch_docs(spec, tokenizer, *, stream, streams, seed=3, block=7, shuffle=True) -> list[str]:
    source = spec.open(stream=stream, num_streams=streams, seed=seed, shuffle=shuffle)
    docs = DocStream(
        source,
        encode=Encoder(tokenizer),
        name="t",
        seed=seed,
        stream=stream,
        block=block,
        shuffle=shuffle,
        infinite=False,
    )
    out = []
    while True:
        try:
            out.append(tokenizer.decode(docs.next()))
        except StopIteration:
            return out


@pytest.mark.parametrize(("world", "workers", "block"), [(2, 2, 7), (1, 1, 7), (3, 2, 7), (1, 1, 10)])
def test_every_document_exactly_once_per_epoch(make_cfg, tokenizers, ids_of, world, workers, block):
    spec = resolve_source(make_cfg().source, make_cfg(), "train", held_out=False)
    streams = world * workers
    per_stream = [
        ids_of(epoch_docs(spec, tokenizers["gpt"], stream=s, streams=streams, block=block))
        for s in range(streams)
    ]
    seen = [i for ids in per_stream for i in ids]
    assert len(seen) == 300 and sorted(seen) == list(range(300))
    assert max(map(len, per_stream)) - min(map(len, per_stream)) <= 1  # balanced


def test_shuffle_is_seeded_and_changes_order(make_cfg, tokenizers, ids_of):
    spec = resolve_source(make_cfg().source, make_cfg(), "train", held_out=False)
    tok = tokenizers["gpt"]
    a = ids_of(epoch_docs(spec, tok, stream=0, streams=1, seed=1))
    assert a == ids_of(epoch_docs(spec, tok, stream=0, streams=1, seed=1))
    assert a != ids_of(epoch_docs(spec, tok, stream=0, streams=1, seed=2))
    assert ids_of(epoch_docs(spec, tok, stream=0, streams=1, shuffle=False)) == list(range(300))
    assert sorted(a) == list(range(300))


def test_infinite_stream_reshuffles_each_epoch(make_cfg, tokenizers, ids_of):
    spec = resolve_source(make_cfg().source, make_cfg(), "train", held_out=False)
    tok = tokenizers["gpt"]
    docs = DocStream(
        spec.open(stream=0, num_streams=1, seed=5, shuffle=True),
        encode=Encoder(tok),
        name="t",
        seed=5,
        stream=0,
        block=50,
        shuffle=True,
        infinite=True,
    )
    first, second = ([tok.decode(docs.next()) for _ in range(300)] for _ in range(2))
    assert sorted(ids_of(first)) == sorted(ids_of(second)) == list(range(300))
    assert ids_of(first) != ids_of(second)


def test_validation_split_is_disjoint_and_deterministic(make_cfg, tokenizers, ids_of):
    cfg = make_cfg(validation_fraction=0.2)
    tok = tokenizers["gpt"]
    train = ids_of(
        epoch_docs(resolve_source(cfg.source, cfg, "train", held_out=True), tok, stream=0, streams=1)
    )
    val = ids_of(
        epoch_docs(resolve_source(cfg.source, cfg, "validation", held_out=True), tok, stream=0, streams=1)
    )
    assert sorted(train + val) == list(range(300)) and not set(train) & set(val)
    assert 30 <= len(val) <= 90  # ~20% of 300


def test_mixture_follows_weights(make_cfg, tokenizers, corpus, tmp_path, ids_of, write_docs):
    write_docs(tmp_path / "other.jsonl", range(1000, 1300))
    tok = tokenizers["gpt"]
    specs = [
        resolve_source(s, make_cfg(), "train", held_out=False)
        for s in (str(corpus / "*.jsonl"), str(tmp_path / "other.jsonl"))
    ]
    parts = [
        DocStream(
            spec.open(stream=0, num_streams=1, seed=i, shuffle=True),
            encode=Encoder(tok),
            name="t",
            seed=i,
            stream=0,
            block=16,
            shuffle=True,
            infinite=True,
        )
        for i, spec in enumerate(specs)
    ]
    mix = Mixture(parts, [3.0, 1.0], seed=0, stream=0)
    ids = ids_of(tok.decode(mix.next()) for _ in range(800))
    share = sum(i < 1000 for i in ids) / len(ids)
    assert 0.70 < share < 0.80  # 3:1 -> 0.75


def test_blocks_capped_by_size_still_cover_everything_once(make_cfg, tokenizers, ids_of, monkeypatch):
    import data.sharding

    monkeypatch.setattr(data.sharding, "MAX_BLOCK_SIZE", 500)  # ~2-10 documents per block instead of 7
    spec = resolve_source(make_cfg().source, make_cfg(), "train", held_out=False)
    seen = [i for s in range(2) for i in ids_of(epoch_docs(spec, tokenizers["gpt"], stream=s, streams=2))]
    assert sorted(seen) == list(range(300))
