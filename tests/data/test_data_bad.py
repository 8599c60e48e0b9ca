"""Bad data: a clear DataError naming the file when the run cannot work, else counted and logged skips."""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import DataConfig, DataError, build_loader, build_tokenizer
from data.sources import resolve_source


def read_all(path_or_glob, cfg):
    source = resolve_source(str(path_or_glob), cfg, "train", held_out=False).open(
        stream=0, num_streams=1, seed=0, shuffle=False
    )
    return [t for _, t in source.documents(0, None)], source.skips.counts


def test_glob_matching_nothing_and_missing_file(tmp_path, make_cfg):
    with pytest.raises(DataError, match=r"'.*/\*\.jsonl' matches no files"):
        resolve_source(str(tmp_path / "*.jsonl"), make_cfg(), "train", held_out=False)
    with pytest.raises(DataError, match=r"'.*/missing\.txt' does not exist"):
        resolve_source(str(tmp_path / "missing.txt"), make_cfg(), "train", held_out=False)


def test_unsupported_type_and_plain_directory(tmp_path, make_cfg):
    (tmp_path / "a.csv").write_text("x\n")
    with pytest.raises(DataError, match=r"unsupported file type '.*a\.csv'; accepted: \.txt"):
        resolve_source(str(tmp_path / "*"), make_cfg(), "train", held_out=False)
    with pytest.raises(DataError, match="is a directory without index.json"):
        resolve_source(str(tmp_path), make_cfg(), "train", held_out=False)


def test_empty_files(tmp_path, make_cfg, caplog):
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(DataError, match=r"every file matching '.*\*\.txt' is empty \(1 files\)"):
        resolve_source(str(tmp_path / "*.txt"), make_cfg(), "train", held_out=False)
    (tmp_path / "b.txt").write_text("some text\n")
    with caplog.at_level(logging.WARNING):
        docs, skips = read_all(tmp_path / "*.txt", make_cfg())
    assert docs == ["some text"] and skips == {"empty_file": 1}
    assert "a.txt (empty file)" in caplog.text


def test_bad_records_are_counted_and_logged(tmp_path, make_cfg, caplog):
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b"{not json",
        json.dumps({"body": "no text field"}).encode(),
        b'{"text": "caf\xe9 in latin-1"}',  # not UTF-8
        json.dumps({"text": "x" * 5000}).encode(),  # over-long line
        json.dumps({"text": 42}).encode(),
        json.dumps(["not", "an", "object"]).encode(),
        json.dumps({"text": "   "}).encode(),
        json.dumps({"text": "good two"}).encode(),
    ]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.INFO):
        docs, skips = read_all(tmp_path / "bad.jsonl", make_cfg(max_record_bytes=1000))
    assert docs == ["good one", "good two"]
    assert skips == {
        "bad_json": 1,
        "missing_field": 2,
        "non_utf8": 1,
        "too_long": 1,
        "not_text": 1,
        "empty": 1,
    }
    for kind in ("bad json", "missing field", "non utf8", "too long", "not text"):
        assert f"bad.jsonl ({kind})" in caplog.text


def test_non_utf8_and_over_long_text_lines(tmp_path, make_cfg):
    (tmp_path / "a.txt").write_bytes(b"fine\n\xff\xfe broken\n" + b"y" * 300 + b"\nfine again\n")
    docs, skips = read_all(tmp_path / "a.txt", make_cfg(text_unit="line", max_record_bytes=100))
    assert docs == ["fine", "fine again"] and skips == {"non_utf8": 1, "too_long": 1}


def test_source_without_any_text(tmp_path, make_cfg):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": f"x{i}"}) + "\n" for i in range(5)))
    cfg = make_cfg(source=str(tmp_path / "a.jsonl"))
    with pytest.raises(
        DataError, match=r"'.*a\.jsonl' has no usable text \(missing_field: 5 records skipped\)"
    ):
        build_tokenizer(cfg, family="gpt", out_dir=tmp_path / "tok")


@pytest.mark.slow
def test_no_text_found_by_a_loader_worker_is_one_clear_error(tmp_path, make_cfg, tokenizers):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": f"x{i}"}) + "\n" for i in range(5)))
    cfg = make_cfg(source=str(tmp_path / "a.jsonl"), num_workers=1)
    batches = build_loader(
        cfg, objective="clm", tokenizer=tokenizers["gpt"], batch_size=2, rank=0, world_size=1, seed=0
    )
    with pytest.raises(DataError) as err:
        next(iter(batches))
    message = str(err.value)
    assert message.startswith("data.source: ") and "no usable document" in message and "\n" not in message
    assert "'missing_field': 5" in message


def test_unreadable_files_name_the_file(tmp_path, make_cfg):
    (tmp_path / "a.jsonl.gz").write_bytes(b"this is not gzip data")
    with pytest.raises(DataError, match=r"cannot read .*a\.jsonl\.gz: Not a gzipped file"):
        read_all(tmp_path / "a.jsonl.gz", make_cfg())
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "truncated"}\n' * 100)[:-30])
    with pytest.raises(DataError, match=r"cannot read .*b\.jsonl\.gz"):
        read_all(tmp_path / "b.jsonl.gz", make_cfg())


def test_parquet_without_the_text_column(tmp_path, make_cfg):
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "a.parquet")
    with pytest.raises(
        DataError, match=r"a\.parquet: no column 'text' \(columns: body\); set data.text_field"
    ):
        read_all(tmp_path / "a.parquet", make_cfg())
    docs, _ = read_all(tmp_path / "a.parquet", make_cfg(text_field="body"))
    assert docs == ["a", "b"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("seq_len", 0, r"data.seq_len: expected an integer >= 8, got 0"),
        ("text_unit", "word", r"data.text_unit: 'word' is not one of file, paragraph, line"),
        ("validation_fraction", 1.5, r"data.validation_fraction: expected a number in \[0, 1\)"),
        ("source", [{"src": "x"}], r"data.source: mixture entries must be"),
        ("num_workers", -1, r"data.num_workers: expected an integer >= 0"),
    ],
)
def test_bad_settings_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**{key: value})


def test_check_sources_is_cheap_and_names_the_setting(tmp_path):
    """What a run calls before creating anything: no data read, no torch imported."""
    code = (
        "import sys, data\n"
        "from data import DataConfig, DataError, check_sources\n"
        "check_sources(DataConfig(source='builtin'))\n"
        f"for kw in (dict(source='{tmp_path}/*.txt'), dict(source=[{{'source': 'builtin'}}, {{'source': '{tmp_path}/x'}}]),"
        f" dict(validation_source='{tmp_path}/v.jsonl')):\n"
        "    try:\n        check_sources(DataConfig(**kw))\n    except DataError as e:\n        print(e)\n"
        "print([m for m in ('torch', 'transformers', 'datasets') if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.splitlines() == [
        f"data.source: '{tmp_path}/*.txt' matches no files",
        f"data.source[1].source: '{tmp_path}/x' does not exist",
        f"data.validation_source: '{tmp_path}/v.jsonl' does not exist",
        "[]",
    ]
