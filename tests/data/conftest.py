"""Shared fixtures: a small generated corpus and tiny tokenizers trained on it (once per session)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data import DataConfig, build_tokenizer

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
]


def doc_text(i: int) -> str:
    """A unique, varied document: its id, then 5..60 words chosen by i."""
    n = 5 + (i * 7) % 56
    return f"doc{i}: " + " ".join(WORDS[(i * 3 + k * k) % len(WORDS)] for k in range(n))


def write_jsonl(path: Path, ids: range) -> None:
    path.write_text("".join(json.dumps({"text": doc_text(i), "id": i}) + "\n" for i in ids))


@pytest.fixture(scope="session")
def write_docs():
    """write_docs(path, ids): a JSONL file of those documents."""
    return write_jsonl


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """5 JSONL files holding documents 0..299."""
    root = tmp_path_factory.mktemp("corpus")
    for f in range(5):
        write_jsonl(root / f"part{f}.jsonl", range(f * 60, (f + 1) * 60))
    return root


def _make_cfg(corpus: Path, **overrides) -> DataConfig:
    base = dict(
        source=str(corpus / "*.jsonl"),
        vocab_size=512,
        seq_len=32,
        num_workers=0,
        shuffle_buffer=16,
        validation_fraction=0.0,
        tokenizer_train_chars=50_000,
    )
    return DataConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def make_cfg(corpus):
    """make_cfg(**overrides) -> a DataConfig over the corpus with tiny settings."""
    return lambda **overrides: _make_cfg(corpus, **overrides)


@pytest.fixture(scope="session")
def tokenizers(corpus, tmp_path_factory):
    """family -> a 512-token BPE trained on the corpus."""
    out = tmp_path_factory.mktemp("tok")
    return {
        fam: build_tokenizer(_make_cfg(corpus), family=fam, out_dir=out / fam)
        for fam in ("gpt", "bert", "t5")
    }


def doc_ids(texts) -> list[int]:
    return [int(t.split(":", 1)[0].removeprefix("doc")) for t in texts]


@pytest.fixture(scope="session")
def ids_of():
    """ids_of(texts) -> the document ids the texts start with."""
    return doc_ids
