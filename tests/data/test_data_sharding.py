"""Every document goes to exactly one (rank, worker) stream per epoch; shuffling is seeded."""

from __future__ import annotations

import io
import os
from pathlib import Path

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


@pytest.mark.parametrize(("streams", "block"), [(4, 7), (1, 7), (6, 7), (1, 10), (5, 3)])
def test_every_document_exactly_once_per_epoch(make_cfg, tokenizers, ids_of, streams, block):
    spec = resolve_source(make_cfg().source, make_cfg(), "train", held_out=False)
    per_stream = [
        ids_of(epoch_docs(spec, tokenizers["gpt"], stream=s, streams=streams, block=block))
        for s in range(streams)
    ]
    seen = [i for ids in per_stream for i in ids]
    assert len(seen) == 300 and sorted(seen) == list(range(300))
    if streams <= 5:  # at least as many files as streams: each stream has whole files (60 documents each)
        assert all(len(ids) % 60 == 0 and len(ids) == 60 * len({i // 60 for i in ids}) for ids in per_stream)
    else:  # fewer: every stream takes every S-th record, balanced
        assert max(map(len, per_stream)) - min(map(len, per_stream)) <= 1


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


class CountingFile(io.RawIOBase):
    """A raw file that counts the bytes the OS hands over (what buffered reads really fetch)."""

    def __init__(self, path: str, counts: dict[str, int]) -> None:
        self._raw, self._path, self._counts = io.FileIO(path), path, counts

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def readinto(self, buffer) -> int:
        n = self._raw.readinto(buffer)
        self._counts[self._path] = self._counts.get(self._path, 0) + n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


@pytest.mark.parametrize("streams", [2, 5])
def test_file_level_sharding_reads_each_file_by_one_stream(
    make_cfg, tokenizers, ids_of, monkeypatch, streams
):
    """At least as many files as streams: a stream opens and reads only its own files, so the streams
    together read the corpus once (not S times), and every document still comes exactly once."""
    import data.files

    cfg = make_cfg()
    spec = resolve_source(cfg.source, cfg, "train", held_out=False)
    read: list[dict[str, int]] = []
    monkeypatch.setattr(
        data.files, "_open_binary", lambda f: io.BufferedReader(CountingFile(f.path, read[-1]))
    )
    seen = []
    for epoch in range(2):
        for s in range(streams):
            read.append({})
            source = spec.open(stream=s, num_streams=streams, seed=3, shuffle=True)
            assert source.by_file
            docs = [text for _, text in source.documents(epoch, None)]
            seen += ids_of(docs)
            assert all(n == os.path.getsize(p) for p, n in read[-1].items())  # whole files, once
            assert {i // 60 for i in ids_of(docs)} == {int(Path(p).stem[-1]) for p in read[-1]}
        files = [p for counts in read[-streams:] for p in counts]
        assert sorted(files) == sorted(f.path for f in spec.files)  # each file by exactly one stream
    assert sorted(seen) == sorted(list(range(300)) * 2)
    corpus = sum(os.path.getsize(f.path) for f in spec.files)
    assert sum(n for counts in read for n in counts.values()) == 2 * corpus


def test_record_level_below_one_file_per_stream(make_cfg, ids_of, tokenizers):
    cfg = make_cfg()
    spec = resolve_source(cfg.source, cfg, "train", held_out=False)
    sources = [spec.open(stream=s, num_streams=6, seed=3, shuffle=True) for s in range(6)]
    assert not any(s.by_file for s in sources)
    per_stream = [ids_of(text for _, text in s.documents(0, None)) for s in sources]
    assert sorted(i for ids in per_stream for i in ids) == list(range(300))


def test_validation_keeps_the_balanced_record_level_split(make_cfg):
    cfg = make_cfg(validation_fraction=0.2)
    spec = resolve_source(cfg.source, cfg, "validation", held_out=True)
    assert not spec.open(stream=0, num_streams=2, seed=0, shuffle=False).by_file
