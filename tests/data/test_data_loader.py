"""Exact resume of the whole pipeline (shuffle buffer, packing, masking, 2 workers) from a JSON state."""

from __future__ import annotations

import json

import pytest
import torch

from data import DataError, build_loader

FAMILY = {"clm": "gpt", "mlm": "bert", "span": "t5"}


def loader(make_cfg, tokenizers, objective, *, workers=2, rank=0, world=1, seed=7, split="train", **cfg):
    config = make_cfg(num_workers=workers, shuffle_buffer=8, **cfg)
    return build_loader(
        config,
        objective=objective,
        tokenizer=tokenizers[FAMILY[objective]],
        batch_size=4,
        rank=rank,
        world_size=world,
        seed=seed,
        split=split,
    )


def take(batches, n):
    return [next(batches) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)


WORKERS = [0, pytest.param(2, marks=pytest.mark.slow)]  # worker processes: slow


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("objective", ["clm", "mlm", "span"])
def test_resume_mid_epoch_gives_the_uninterrupted_batches(make_cfg, tokenizers, objective, workers):
    run = loader(make_cfg, tokenizers, objective, workers=workers, rank=1, world=2)
    batches = iter(run)
    take(batches, 5)  # an odd count, so with 2 workers the next batch comes from the second one
    state = json.loads(json.dumps(run.state_dict()))  # what a checkpoint stores
    expected = take(batches, 7)

    resumed = loader(make_cfg, tokenizers, objective, workers=workers, rank=1, world=2)
    resumed.load_state_dict(state)
    assert_same(take(iter(resumed), 7), expected)


def test_resume_across_epoch_boundaries_in_process(make_cfg, tokenizers):
    run = loader(make_cfg, tokenizers, "clm", workers=0)
    batches = iter(run)
    take(batches, 150)  # > one epoch of the 300-document corpus (~18k tokens, 128 per batch)
    state = json.loads(json.dumps(run.state_dict()))
    assert state["streams"]["0"]["state"]["doc"]["epoch"] >= 1
    expected = take(batches, 10)
    resumed = loader(make_cfg, tokenizers, "clm", workers=0)
    resumed.load_state_dict(state)
    assert_same(take(iter(resumed), 10), expected)


def test_resume_of_a_weighted_mixture(make_cfg, tokenizers, corpus, tmp_path, write_docs):
    write_docs(tmp_path / "other.jsonl", range(1000, 1100))
    mixture = [{"source": str(corpus / "*.jsonl"), "weight": 2.0}, {"source": str(tmp_path / "other.jsonl")}]
    run = loader(make_cfg, tokenizers, "mlm", workers=0, source=mixture)
    batches = iter(run)
    take(batches, 9)
    state = json.loads(json.dumps(run.state_dict()))
    expected = take(batches, 6)
    resumed = loader(make_cfg, tokenizers, "mlm", workers=0, source=mixture)
    resumed.load_state_dict(state)
    assert_same(take(iter(resumed), 6), expected)


@pytest.mark.slow
def test_state_is_small_json_and_settings_are_checked(make_cfg, tokenizers):
    run = loader(make_cfg, tokenizers, "clm")
    batches = iter(run)
    take(batches, 3)
    state = run.state_dict()
    assert json.loads(json.dumps(state)) == state and len(json.dumps(state)) < 4000
    other = loader(make_cfg, tokenizers, "clm", workers=1, seq_len=64)
    with pytest.raises(DataError, match="seq_len: saved 32, now 64"):
        other.load_state_dict(state)


def test_ranks_and_seeds_give_different_batches(make_cfg, tokenizers):
    def first(**kw):
        return next(iter(loader(make_cfg, tokenizers, "clm", workers=0, **kw)))["input_ids"]

    assert torch.equal(first(seed=1), first(seed=1))
    assert not torch.equal(first(seed=1), first(seed=2))
    assert not torch.equal(first(rank=0, world=2), first(rank=1, world=2))


@pytest.mark.parametrize("workers", WORKERS)
def test_validation_is_finite_and_deterministic(make_cfg, tokenizers, workers):
    run = loader(make_cfg, tokenizers, "clm", workers=workers, split="validation", validation_fraction=0.3)
    a, b = list(run), list(run)  # each pass starts from the beginning
    assert_same(a, b)
    tokens = sum(x["input_ids"].numel() for x in a)
    assert 2000 < tokens < 10_000  # ~30% of ~18k tokens, minus the tail chunk of each worker


@pytest.mark.parametrize("objective", ["clm", "mlm", "span"])
def test_batch_shapes_and_keys(make_cfg, tokenizers, objective):
    batch = next(iter(loader(make_cfg, tokenizers, objective, workers=0)))
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    expected = {
        "clm": {"input_ids": (4, 32), "labels": (4, 32)},
        "mlm": {k: (4, 32) for k in ("input_ids", "token_type_ids", "attention_mask", "labels")},
        "span": {"input_ids": (4, 32), "attention_mask": (4, 32), "labels": (4, 8)},
    }[objective]
    assert shapes == expected
    assert all(v.dtype == torch.int64 for v in batch.values())
    if objective == "clm":
        assert torch.equal(batch["input_ids"], batch["labels"])


def test_validation_source_and_no_held_out_split(make_cfg, tokenizers, corpus, tmp_path, write_docs):
    assert (
        list(loader(make_cfg, tokenizers, "clm", workers=0, split="validation", validation_fraction=0.0))
        == []
    )
    write_docs(tmp_path / "val.jsonl", range(2000, 2040))
    val = list(
        loader(
            make_cfg,
            tokenizers,
            "clm",
            workers=0,
            split="validation",
            validation_source=str(tmp_path / "val.jsonl"),
        )
    )
    text = tokenizers["gpt"].decode(torch.cat([b["input_ids"].flatten() for b in val]))
    assert "doc2000:" in text and "doc0:" not in text


def test_resume_reads_one_block_whatever_the_position(make_cfg, tokenizers, monkeypatch):
    """No replay: loading a state re-reads at most one shuffle block and re-tokenises only what it emits."""
    from data.files import FileSource
    from data.tokenizer import Encoder

    counts = {"read": 0, "encoded": 0}
    documents, encode = FileSource.documents, Encoder.__call__

    def counted_documents(self, epoch, cursor):
        for item in documents(self, epoch, cursor):
            counts["read"] += 1
            yield item

    def counted_encode(self, text):
        counts["encoded"] += 1
        return encode(self, text)

    cost = {}
    for position in (3, 300):  # early in epoch 0; past two epochs of the 300-document corpus
        run = loader(make_cfg, tokenizers, "clm", workers=0)
        batches = iter(run)
        take(batches, position)
        state = json.loads(json.dumps(run.state_dict()))
        cost[f"epoch{position}"] = state["streams"]["0"]["state"]["doc"]["epoch"]
        expected = take(batches, 1)
        with monkeypatch.context() as patch:
            patch.setattr(FileSource, "documents", counted_documents)
            patch.setattr(Encoder, "__call__", counted_encode)
            counts.update(read=0, encoded=0)
            resumed = loader(make_cfg, tokenizers, "clm", workers=0)
            resumed.load_state_dict(state)
            assert_same(take(iter(resumed), 1), expected)
            cost[position] = dict(counts)
    assert cost["epoch3"] == 0 and cost["epoch300"] >= 1
    assert cost[300]["read"] <= 8 + 8  # one block (shuffle_buffer=8) plus the next one at most
    assert cost[300]["encoded"] <= 8  # the documents one batch of 4 x 32 tokens spans
    assert abs(cost[300]["read"] - cost[3]["read"]) <= 8


def test_resume_of_an_hf_stream(make_cfg, tokenizers, tmp_path, write_docs):
    (tmp_path / "hub").mkdir()
    for f in range(2):
        write_docs(tmp_path / "hub" / f"part{f}.jsonl", range(f * 40, f * 40 + 40))
    source = f"hf:{tmp_path / 'hub'}"
    run = loader(make_cfg, tokenizers, "span", workers=0, source=source, rank=1, world=2)
    batches = iter(run)
    take(batches, 4)
    state = json.loads(json.dumps(run.state_dict()))
    expected = take(batches, 4)
    resumed = loader(make_cfg, tokenizers, "span", workers=0, source=source, rank=1, world=2)
    resumed.load_state_dict(state)
    assert_same(take(iter(resumed), 4), expected)
