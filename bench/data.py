"""Data pipeline speed: tokens/s delivered (streaming + tokenising + packing, and reading prepared shards),
next to the tokens/s the tiny models consume, and the time to resume at an early and a late position.

The data path must never be the bottleneck, and resuming must not replay: resume time should not grow
with the position. Shapes are those of configs/gpt-tiny.yaml (builtin corpus, vocab 4096, seq_len 128,
micro-batch 16) unless changed. Also the bytes each of S streams really reads (the kernel's count,
/proc/self/io rchar) for one epoch of its share, with file-level sharding and with every stream reading
all files (record-level, what a source with fewer files than streams does).

    .venv/bin/python -m bench.data                 # ~2-3 minutes on 2 cores
    .venv/bin/python -m bench.data --quick         # shorter measurements, earlier "late" position
    .venv/bin/python -m bench.data --bytes-read    # only the bytes-read table (~20 s)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from bench._common import print_table
from data import DataConfig, build_loader, build_tokenizer
from data.prepare import prepare_shards
from data.sources import resolve_source

FAMILY = {"clm": "gpt", "mlm": "bert", "span": "t5"}


def make_cfg(source: str, workers: int, args) -> DataConfig:
    return DataConfig(source=source, vocab_size=args.vocab_size, seq_len=args.seq_len, num_workers=workers)


def loader(cfg: DataConfig, objective: str, tokenizer, args):
    return build_loader(
        cfg,
        objective=objective,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        rank=0,
        world_size=1,
        seed=0,
    )


def throughput(cfg: DataConfig, objective: str, tokenizer, args) -> float:
    """Input tokens per second delivered to the training loop, after the first batch (worker start-up)."""
    batches = iter(loader(cfg, objective, tokenizer, args))
    next(batches)
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        tokens += next(batches)["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def model_tokens_per_s(args, vocab_size: int) -> list[list[str]]:
    """A full training step (forward, backward, AdamW) of the tiny models on a batch of the same shape."""
    try:
        from models import build_model
    except ImportError:
        return [["(models.build_model not available)", "-", "~1,000 (notes: GPT-2 6x384, batch 8x256)"]]
    rows = []
    demo = {
        "n_layers": 2,
        "d_model": 128,
        "n_heads": 4,
        "d_ff": 512,
        "max_seq_len": 128,
    }  # configs/gpt-tiny.yaml
    for name, overrides in (("gpt-tiny (preset)", {}), ("gpt-tiny (configs/gpt-tiny.yaml)", demo)):
        torch.manual_seed(0)
        model = build_model("gpt-tiny", vocab_size=vocab_size, **overrides)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, vocab_size, (args.batch_size, args.seq_len))

        def step(model=model, optimizer=optimizer, ids=ids) -> None:
            optimizer.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()

        step()
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds or steps < 3:
            step()
            steps += 1
        rate = steps * ids.numel() / (time.perf_counter() - start)
        rows.append([name, f"{args.batch_size}x{args.seq_len}", f"{rate:,.0f}"])
    return rows


def resume_rows(name: str, cfg: DataConfig, tokenizer, args) -> list[list[str]]:
    """Seconds from a fresh loader + load_state_dict to the first batch (median of 3), early and late."""
    rows = []
    for label, position in (("early", 5), ("late", args.late)):
        run = loader(cfg, "clm", tokenizer, args)
        start = time.perf_counter()
        batches = iter(run)
        for _ in islice(batches, position):
            pass
        reach = time.perf_counter() - start
        state = json.loads(json.dumps(run.state_dict()))
        expected = next(batches)["input_ids"]
        del batches, run
        times = []
        for _ in range(3):
            gc.collect()  # the previous loader's workers are gone before the clock starts
            start = time.perf_counter()
            resumed = loader(cfg, "clm", tokenizer, args)
            resumed.load_state_dict(state)
            first = next(iter(resumed))["input_ids"]
            times.append(time.perf_counter() - start)
            assert torch.equal(first, expected), "resumed batch differs from the uninterrupted one"
            del resumed
        epochs = _epochs(state)
        rows.append(
            [
                name,
                f"{label}: batch {position} (epoch {'/'.join(map(str, epochs))})",
                f"{len(json.dumps(state))} B",
                f"{statistics.median(times):.2f}",
                f"{reach:.1f}",
            ]
        )
    return rows


def _epochs(state: dict) -> list[int]:
    """The epoch each virtual stream of a loader state is in."""
    return sorted({s["state"]["doc"]["epoch"] for s in state["streams"].values() if s["state"]})


def _rchar() -> int:
    """Bytes this process has read through read() calls so far (Linux)."""
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("rchar:")).split()[1])


def bytes_read_rows(source: str, streams_counts: tuple[int, ...]) -> list[list[str]]:
    """Per stream of S: bytes read for one epoch of its documents, file-level vs every file read."""
    from data.files import FileSource

    cfg = DataConfig(source=source)
    spec = resolve_source(source, cfg, "train", held_out=True)
    corpus = sum(os.path.getsize(f.path) for f in spec.files)
    rows = []
    for S in streams_counts:
        for by_file in (True, False):
            if by_file and len(spec.files) < S:
                continue
            per_stream = []
            for s in range(S):
                src = FileSource(
                    spec.files,
                    cfg,
                    split="train",
                    held_out=spec.held_out,
                    stream=s,
                    num_streams=S,
                    seed=0,
                    shuffle=True,
                    unit=spec.unit,
                    by_file=by_file,
                )
                before = _rchar()
                for _ in src.documents(0, None):
                    pass
                per_stream.append(_rchar() - before)
            mean = statistics.mean(per_stream)
            rows.append(
                [
                    str(S),
                    "file-level" if by_file else "record-level (every file)",
                    f"{mean / 1e6:.2f}",
                    f"{min(per_stream) / 1e6:.2f}-{max(per_stream) / 1e6:.2f}",
                    f"{corpus / 1e6:.2f}",
                    f"{mean / corpus:.3f}",
                    f"{sum(per_stream) / corpus:.2f}",
                ]
            )
    return rows


def print_bytes_read(source: str = "builtin") -> None:
    rows = bytes_read_rows(source, (1, 4, 16))
    print(f"\nbytes read per stream for one epoch of its share ({source}; /proc/self/io rchar)")
    print_table(
        ["S", "sharding", "MB/stream", "min-max", "corpus MB", "per stream / corpus", "all streams / corpus"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bytes-read", action="store_true", help="only the bytes-read-per-stream table")
    args = parser.parse_args()
    if args.bytes_read:
        print_bytes_read()
        return
    args.seconds = 2.0 if args.quick else 6.0
    args.late = 400 if args.quick else 2500  # 2500 x 2048 tokens: past one epoch of the builtin corpus

    with tempfile.TemporaryDirectory() as tmp:
        base = make_cfg("builtin", 2, args)
        start = time.perf_counter()
        tokenizers = {
            obj: build_tokenizer(base, family=fam, out_dir=Path(tmp, fam)) for obj, fam in FAMILY.items()
        }
        tokenizer_s = (time.perf_counter() - start) / 3
        summary = prepare_shards(base, Path(tmp, "shards"), tokenizer=tokenizers["clm"], num_procs=2)
        shards = str(Path(tmp, "shards"))

        rows = []
        for source, label in (
            ("builtin", "streaming builtin (read+tokenise+pack)"),
            (shards, "prepared shards"),
        ):
            objectives = ("clm", "mlm", "span") if source == "builtin" else ("clm",)
            for objective in objectives:
                for workers in (0, 1, 2) if objective == "clm" else (2,):  # 0: in the training process
                    rate = throughput(make_cfg(source, workers, args), objective, tokenizers[objective], args)
                    rows.append([label, objective, str(workers), f"{rate:,.0f}"])
        print(
            f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work skews every figure)"
        )
        print(
            f"batch {args.batch_size}x{args.seq_len}, vocab {args.vocab_size}; tokenizer training "
            f"{tokenizer_s:.1f} s; prepare (2 procs): {summary['seconds']} s, {summary['tokens_per_s']:,} tokens/s, "
            f"{summary['splits']['train']['tokens']:,} train tokens\n"
        )
        print_table(["pipeline", "objective", "workers", "tokens/s delivered"], rows)
        print()
        print_table(
            ["model step (fwd+bwd+AdamW)", "batch", "tokens/s consumed"],
            model_tokens_per_s(args, len(tokenizers["clm"])),
        )
        print()
        resume = resume_rows("streaming builtin", make_cfg("builtin", 2, args), tokenizers["clm"], args)
        resume += resume_rows("prepared shards", make_cfg(shards, 2, args), tokenizers["clm"], args)
        print_table(["source (2 workers)", "position", "state", "resume s", "replay s (reaching it)"], resume)
    print_bytes_read()


if __name__ == "__main__":
    main()
