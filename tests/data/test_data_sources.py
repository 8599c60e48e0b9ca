"""File formats, compression, and resuming a file source from any cursor."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data import DataError
from data.corpus import builtin_files
from data.files import in_validation
from data.sources import resolve_source

DOCS = [f"document {i}\nwith a second line é" for i in range(23)]


def write(path, docs, kind):
    if kind == "parquet":
        pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path, row_group_size=5)
        return
    if kind == "json":
        data = json.dumps([{"text": d} for d in docs]).encode()
    elif kind == "jsonl":
        data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    else:  # txt, one paragraph per document
        data = "\n\n".join(docs).encode() + b"\n"
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


CASES = ["a.txt", "a.jsonl", "a.json", "a.parquet", "a.jsonl.gz", "a.txt.zst", "a.json.gz"]


def texts(spec, cursor=None):
    source = spec.open(stream=0, num_streams=1, seed=0, shuffle=False)
    return list(source.documents(0, cursor))


@pytest.mark.parametrize("name", CASES)
def test_formats_read_every_document_and_resume_from_any_cursor(tmp_path, make_cfg, name):
    kind = {"txt": "txt", "jsonl": "jsonl", "json": "json", "parquet": "parquet"}[name.split(".")[1]]
    write(tmp_path / name, DOCS, kind)
    spec = resolve_source(str(tmp_path / name), make_cfg(), "train", held_out=False)
    read = texts(spec)
    assert [t for _, t in read] == DOCS
    for k in (1, 6, 22):  # from the cursor after document k: exactly the rest
        assert [t for _, t in texts(spec, read[k - 1][0])] == DOCS[k:]


def test_text_units(tmp_path, make_cfg):
    (tmp_path / "a.txt").write_text("one\ntwo\n\n\nthree\n")

    def read(unit):
        spec = resolve_source(str(tmp_path / "a.txt"), make_cfg(text_unit=unit), "train", held_out=False)
        return [t for _, t in texts(spec)]

    assert read("paragraph") == ["one\ntwo", "three"]
    assert read("line") == ["one", "two", "three"]
    assert read("file") == ["one\ntwo\n\n\nthree\n"]


def test_builtin_corpus_is_the_standard_library_split_deterministically(make_cfg):
    files = builtin_files()
    assert len(files) > 300 and sum(f.stat().st_size for f in files) > 5_000_000
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    cfg = make_cfg(source="builtin", validation_fraction=0.05)
    train = resolve_source("builtin", cfg, "train", held_out=True)
    keys = [f.key for f in train.files]
    assert keys == sorted(keys) and "os.py" in keys
    val = [k for k in keys if in_validation(k, 0, 0.05)]
    assert 0.02 < len(val) / len(keys) < 0.09
    assert in_validation("os.py", 0, 0.05) == in_validation("os.py", 0, 0.05)


def test_mixture_config_from_dicts(make_cfg, corpus):
    cfg = make_cfg(source=[{"source": str(corpus / "*.jsonl"), "weight": 2}, {"source": "builtin"}])
    assert [(c.source, c.weight) for c in cfg.components] == [(str(corpus / "*.jsonl"), 2), ("builtin", 1.0)]


def test_hf_source_streams_shards_and_resumes_locally(tmp_path, make_cfg, write_docs, ids_of):
    """The hf: code path on a local dataset directory (datasets' own loader; no network)."""
    for f in range(3):
        write_docs(tmp_path / f"part{f}.jsonl", range(f * 10, f * 10 + 10))
    spec = resolve_source(f"hf:{tmp_path}", make_cfg(), "train", held_out=True)
    per_stream = [texts_of(spec, stream=s, streams=2) for s in range(2)]
    assert sorted(ids_of(t for _, t in per_stream[0] + per_stream[1])) == list(range(30))
    full = per_stream[1]
    cursor = json.loads(json.dumps(full[4][0]))  # JSON round trip, as in a checkpoint
    source = spec.open(stream=1, num_streams=2, seed=0, shuffle=True)
    assert [t for _, t in source.documents(0, cursor)] == [t for _, t in full[5:]]
    with pytest.raises(DataError, match=r"cannot load 'hf:.*' split 'validation'"):
        texts_of(
            resolve_source(f"hf:{tmp_path}", make_cfg(), "validation", held_out=True), stream=0, streams=1
        )


def texts_of(spec, *, stream, streams):
    return list(spec.open(stream=stream, num_streams=streams, seed=0, shuffle=True).documents(0, None))
