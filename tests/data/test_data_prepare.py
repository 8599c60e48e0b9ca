"""Prepared token shards: same tokens and same batches as streaming the source, O(1) random access."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data import DataError, build_loader, build_tokenizer
from data.prepare import prepare_shards
from data.sharding import DocStream
from data.sources import resolve_source
from data.tokenizer import Encoder


@pytest.fixture(scope="module")
def prepared(make_cfg, tokenizers, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "shards"
    summary = prepare_shards(make_cfg(validation_fraction=0.2), out, tokenizer=tokenizers["gpt"], num_procs=1)
    return out, summary


def test_summary_and_index(prepared):
    out, summary = prepared
    index = json.loads((out / "index.json").read_text())
    docs = {split: s["docs"] for split, s in summary["splits"].items()}
    assert docs["train"] + docs["validation"] == 300 and 30 <= docs["validation"] <= 90
    assert index["dtype"] == "uint16" and len(index["splits"]["train"]["files"]) == 5
    assert sum(f["docs"] for f in index["splits"]["train"]["files"]) == docs["train"]
    offsets = np.concatenate(
        [np.load(out / f"{s['name']}.idx.npy")[1:] for s in index["splits"]["train"]["shards"]]
    )
    assert len(offsets) == docs["train"]


def test_prepared_documents_equal_tokenised_source(prepared, make_cfg, tokenizers):
    out, _ = prepared
    cfg = make_cfg(validation_fraction=0.2)
    encode = Encoder(tokenizers["gpt"])
    for split in ("train", "validation"):
        stream = resolve_source(cfg.source, cfg, split, held_out=True).open(
            stream=0, num_streams=1, seed=0, shuffle=False
        )
        shards = resolve_source(str(out), cfg, split, held_out=True).open(
            stream=0, num_streams=1, seed=0, shuffle=False
        )
        expected = [encode(text) for _, text in stream.documents(0, None)]
        got = [tokens for _, tokens in shards.documents(0, None)]
        assert len(got) == len(expected) > 0
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_prepared_batches_equal_streaming_batches(prepared, make_cfg, tokenizers, tmp_path):
    out, _ = prepared
    streaming_cfg = make_cfg(validation_fraction=0.2, shuffle_buffer=8)
    shards_cfg = make_cfg(source=str(out), shuffle_buffer=8)
    tokenizer = build_tokenizer(shards_cfg, family="gpt", out_dir=tmp_path / "tok")  # the one saved with them
    assert tokenizer.get_vocab() == tokenizers["gpt"].get_vocab()

    def batches(cfg):
        it = iter(
            build_loader(
                cfg, objective="clm", tokenizer=tokenizer, batch_size=4, rank=1, world_size=2, seed=4
            )
        )
        return [next(it)["input_ids"] for _ in range(40)]  # > one epoch of this rank's share

    for a, b in zip(batches(streaming_cfg), batches(shards_cfg), strict=True):
        assert torch.equal(a, b)


def test_shards_refuse_another_tokenizer(prepared, make_cfg, tokenizers):
    out, _ = prepared
    with pytest.raises(DataError, match="tokenised with another tokenizer"):
        build_loader(
            make_cfg(source=str(out)),
            objective="mlm",
            tokenizer=tokenizers["bert"],
            batch_size=4,
            rank=0,
            world_size=1,
            seed=4,
        )


def test_prepared_coverage_two_ranks_two_workers(prepared, make_cfg, tokenizers, ids_of):
    out, summary = prepared
    spec = resolve_source(str(out), make_cfg(), "train", held_out=True)
    seen = []
    for stream in range(4):
        docs = DocStream(
            spec.open(stream=stream, num_streams=4, seed=1, shuffle=True),
            encode=None,
            name="p",
            seed=1,
            stream=stream,
            block=5,
            shuffle=True,
            infinite=False,
        )
        while True:
            try:
                seen += ids_of([tokenizers["gpt"].decode(docs.next())])
            except StopIteration:
                break
    assert len(seen) == len(set(seen)) == summary["splits"]["train"]["docs"]


def test_prepare_refuses_a_prepared_directory(prepared, make_cfg, tokenizers):
    out, _ = prepared
    with pytest.raises(DataError, match="already holds prepared shards"):
        prepare_shards(make_cfg(), out, tokenizer=tokenizers["gpt"], num_procs=1)


def test_prepare_a_streamed_hf_dataset(make_cfg, tokenizers, tmp_path, write_docs):
    """hf: sources are read in order and tokenised in parallel batches (local dataset dir, no network)."""
    (tmp_path / "hub").mkdir()
    for f in range(3):
        write_docs(tmp_path / "hub" / f"part{f}.jsonl", range(f * 10, f * 10 + 10))
    cfg = make_cfg(source=f"hf:{tmp_path / 'hub'}")
    summary = prepare_shards(cfg, tmp_path / "out", tokenizer=tokenizers["gpt"], num_procs=1)
    assert summary["splits"]["train"]["docs"] == 30 and summary["splits"]["validation"]["docs"] == 0
    source = resolve_source(str(tmp_path / "out"), cfg, "train", held_out=True)
    docs = [
        tokens for _, tokens in source.open(stream=0, num_streams=1, seed=0, shuffle=False).documents(0, None)
    ]
    streamed = resolve_source(cfg.source, cfg, "train", held_out=True).open(
        stream=0, num_streams=1, seed=0, shuffle=False
    )
    encode = Encoder(tokenizers["gpt"])
    assert all(
        np.array_equal(a, encode(t)) for a, (_, t) in zip(docs, streamed.documents(0, None), strict=True)
    )


@pytest.mark.slow
def test_parallel_prepare_writes_the_same_documents(prepared, make_cfg, tokenizers, tmp_path):
    out, summary = prepared
    parallel = prepare_shards(
        make_cfg(validation_fraction=0.2), tmp_path / "p", tokenizer=tokenizers["gpt"], num_procs=2
    )
    assert parallel["splits"]["train"]["shards"] > summary["splits"]["train"]["shards"]  # really split up
    cfg = make_cfg()
    for split in ("train", "validation"):
        a, b = (
            [
                t
                for _, t in resolve_source(str(d), cfg, split, held_out=True)
                .open(stream=0, num_streams=1, seed=0, shuffle=False)
                .documents(0, None)
            ]
            for d in (out, tmp_path / "p")
        )
        assert len(a) == len(b) > 0 and all(np.array_equal(x, y) for x, y in zip(a, b))
