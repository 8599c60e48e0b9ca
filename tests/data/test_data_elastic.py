"""Resume at another world size: the global micro-batch sequence (documents, offsets, masks) does not depend
on the number of ranks, accumulation steps or loader workers, and a state saved at one layout continues
exactly at another. Ranks are simulated in-process by building each rank's pipeline; workers are real."""

from __future__ import annotations

import json
import re

import pytest
import torch

from data import DataError, Layout, build_loader, merge_states, plan_resume
from data.layout import expected_batches

FAMILY = {"clm": "gpt", "mlm": "bert", "span": "t5"}
B = 4  # micro-batches per optimizer step, over all ranks
LAYOUTS = [(1, 4), (2, 2), (4, 1)]  # (world size, grad_accum), each B = 4
V = 8  # virtual streams: B x 2 workers, the default of a first run with num_workers=2


@pytest.fixture(scope="module")
def many_files(tmp_path_factory, write_docs):
    """16 files of 20 documents (ids 0..319): at least one file per virtual stream, so file-level sharding."""
    root = tmp_path_factory.mktemp("many")
    for f in range(16):
        write_docs(root / f"part{f:02d}.jsonl", range(f * 20, (f + 1) * 20))
    return str(root / "*.jsonl")


def pipelines(make_cfg, tokenizers, objective, *, world, accum, workers=2, states=None, **cfg):
    config = make_cfg(num_workers=workers, shuffle_buffer=8, virtual_streams=V, **cfg)
    loaders = []
    for rank in range(world):
        loader = build_loader(
            config,
            objective=objective,
            tokenizer=tokenizers[FAMILY[objective]],
            batch_size=2,
            rank=rank,
            world_size=world,
            seed=11,
            grad_accum=accum,
        )
        if states is not None:
            loader.load_state_dict(states if isinstance(states, dict) else states[rank])
        loaders.append(loader)
    return loaders, [iter(loader) for loader in loaders]


def steps(iterators, accum, count):
    """The global micro-batches of `count` steps, in the order k = step x B + rank x accum + a."""
    return [next(it) for _ in range(count) for it in iterators for _ in range(accum)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def saved(loaders):
    return [json.loads(json.dumps(loader.state_dict())) for loader in loaders]  # what checkpoints hold


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mlm", "span"])
@pytest.mark.parametrize("source", ["five_files", "many_files"])
def test_global_sequence_is_the_same_for_every_world_size(
    make_cfg, tokenizers, objective, source, many_files, corpus
):
    files = str(corpus / "*.jsonl") if source == "five_files" else many_files  # record- / file-level
    sequences = [
        steps(pipelines(make_cfg, tokenizers, objective, world=w, accum=a, source=files)[1], a, 5)
        for w, a in LAYOUTS
    ]
    for other in sequences[1:]:
        assert_same(other, sequences[0])
    ids = [tuple(b["input_ids"].flatten().tolist()) for b in sequences[0]]
    assert len(set(ids)) == len(ids) == 5 * B  # real, distinct micro-batches
    in_process = pipelines(make_cfg, tokenizers, objective, world=2, accum=2, workers=0, source=files)
    assert_same(steps(in_process[1], 2, 5), sequences[0])  # and for any number of workers


@pytest.mark.slow
@pytest.mark.parametrize("new", [(1, 4), (4, 1)])
def test_resume_at_another_world_size_continues_exactly(make_cfg, tokenizers, many_files, new):
    """2 ranks save after 3 steps; resuming with 1 or 4 ranks gives the uninterrupted 2-rank continuation,
    micro-batch for micro-batch, and no document is lost or repeated."""
    loaders, its = pipelines(make_cfg, tokenizers, "clm", world=2, accum=2, source=many_files)
    before = steps(its, 2, 3)
    states = saved(loaders)
    after = steps(its, 2, 4)

    world, accum = new
    assert plan_resume(states[0], world_size=world, num_workers=2, micro_batch_size=2) == accum
    merged = merge_states(states)
    resumed = steps(
        pipelines(make_cfg, tokenizers, "clm", world=world, accum=accum, states=merged, source=many_files)[1],
        accum,
        4,
    )
    assert_same(resumed, after)

    # per virtual stream (micro-batch k is stream k % V's), the tokens run on without a gap or a repeat
    tok = tokenizers["gpt"]
    per_stream: dict[int, list[int]] = {}
    for k, batch in enumerate(before + resumed):
        per_stream.setdefault(k % V, []).extend(batch["input_ids"].flatten().tolist())
    owners: dict[int, int] = {}
    for v, tokens in per_stream.items():
        docs = [int(m) for m in re.findall(r"(?:^|<\|endoftext\|>)doc(\d+):", tok.decode(tokens))]
        assert len(docs) == len(set(docs)) > 2  # within the first epoch of each stream: no repeat
        for d in docs:
            assert owners.setdefault(d // 20, v) == v  # file-level: a file belongs to one stream
    counts = [merged["streams"][str(v)]["batches"] for v in range(V)]
    assert merged["position"] == 3 * B and counts == [2, 2, 2, 2, 1, 1, 1, 1]  # micro-batches 0..11
    assert counts == [expected_batches(v, 3 * B, V) for v in range(V)]


@pytest.mark.slow
def test_same_layout_resume_is_exact_mid_step(make_cfg, tokenizers):
    loaders, its = pipelines(make_cfg, tokenizers, "mlm", world=2, accum=2)
    for _ in range(5):  # 2.5 steps: the next micro-batch comes from the second worker, mid-step
        next(its[1])
    state = saved(loaders)[1]
    expected = [next(its[1]) for _ in range(6)]
    one = build_loader(
        make_cfg(num_workers=2, shuffle_buffer=8, virtual_streams=V),
        objective="mlm",
        tokenizer=tokenizers["bert"],
        batch_size=2,
        rank=1,
        world_size=2,
        seed=11,
        grad_accum=2,
    )
    one.load_state_dict(state)
    batches = iter(one)
    assert_same([next(batches) for _ in range(6)], expected)
    with pytest.raises(DataError, match="saved mid-step"):
        merge_states(saved(loaders))


def test_in_process_resume_from_one_rank_at_fewer_workers(make_cfg, tokenizers):
    """One rank holds every virtual stream: its own state restores at another grad_accum / worker count."""
    loaders, its = pipelines(make_cfg, tokenizers, "span", world=1, accum=4, workers=0)
    steps(its, 4, 2)
    state = saved(loaders)[0]
    expected = steps(its, 4, 3)
    _, resumed = pipelines(make_cfg, tokenizers, "span", world=1, accum=4, workers=0, states=[state])
    assert_same(steps(resumed, 4, 3), expected)
    _, split = pipelines(make_cfg, tokenizers, "span", world=2, accum=2, workers=0, states=state)
    assert_same(steps(split, 2, 3), expected)


def test_refusals_are_one_line_and_name_what_works(make_cfg, tokenizers):
    loaders, its = pipelines(make_cfg, tokenizers, "clm", world=2, accum=2, workers=0)
    steps(its, 2, 1)
    states = saved(loaders)

    def message(call) -> str:
        with pytest.raises(DataError) as err:
            call()
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "world size must divide it: 1, 2, 4" in message(
        lambda: plan_resume(states[0], world_size=3, num_workers=0)
    )
    assert "resume with train.micro_batch_size=2" in message(
        lambda: plan_resume(states[0], world_size=2, num_workers=0, micro_batch_size=4)
    )
    # V = 8, B = 4: 4 ranks x 3 workers would need a multiple of 12
    text = message(lambda: plan_resume(states[0], world_size=4, num_workers=3))
    assert "world sizes that work with num_workers=3: none" in text
    assert "num_workers that work at world size 4: 0, 1, 2" in text
    assert "each rank's state is needed once" in message(lambda: merge_states(states[:1]))
    assert "needs every rank's state" in message(
        lambda: pipelines(make_cfg, tokenizers, "clm", world=1, accum=4, workers=0, states=states)
    )
    assert "data.virtual_streams: the checkpoint has 8, this run sets 16" in message(
        lambda: build_loader(
            make_cfg(num_workers=0, shuffle_buffer=8, virtual_streams=16),
            objective="clm",
            tokenizer=tokenizers["gpt"],
            batch_size=2,
            rank=0,
            world_size=2,
            seed=11,
            grad_accum=2,
        ).load_state_dict(states[0])
    )
    assert "needs a multiple of 8" in message(
        lambda: Layout(world_size=4, grad_accum=1, num_workers=2, virtual_streams=12).check()
    )


def test_default_virtual_streams_come_from_the_checkpoint(make_cfg, tokenizers):
    """Unset data.virtual_streams: the first run's B x workers, kept when a resume's own default differs."""
    config = make_cfg(num_workers=0, shuffle_buffer=8)

    def build(world, accum):
        return build_loader(
            config,
            objective="clm",
            tokenizer=tokenizers["gpt"],
            batch_size=2,
            rank=0,
            world_size=world,
            seed=11,
            grad_accum=accum,
        )

    first = build(1, 4)
    batches = iter(first)
    [next(batches) for _ in range(4)]
    state = first.state_dict()
    assert state["virtual_streams"] == 4
    expected = [next(batches) for _ in range(2)]
    second = build(2, 2)  # would default to 4 too; build(4, 1) the same: B stays 4
    second.load_state_dict(state)
    assert second.layout.virtual_streams == 4
    resumed = iter(second)
    assert_same([next(resumed) for _ in range(1)], expected[:1])  # rank 0 of 2 gets k = 4, 5 of step 1
