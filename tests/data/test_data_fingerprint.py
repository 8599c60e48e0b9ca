"""A checkpoint's data fingerprint: a change is refused in one line naming the first changed file, or, with
data.allow_changed=true, resumed with a warning at the saved positions."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from data import DataError, build_loader, check_fingerprint, data_fingerprint


@pytest.fixture
def files(corpus, tmp_path):
    """A private copy of the 5-file corpus, free to change."""
    root = tmp_path / "c"
    shutil.copytree(corpus, root)
    return root


def refusal(saved, cfg) -> str:
    with pytest.raises(DataError) as err:
        check_fingerprint(saved, cfg)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_unchanged_data_passes_and_the_fingerprint_is_json(make_cfg, files):
    cfg = make_cfg(source=str(files / "*.jsonl"))
    saved = json.loads(json.dumps(data_fingerprint(cfg)))
    assert check_fingerprint(saved, cfg) is None
    assert [f[0] for f in saved["sources"]["data.source"]["files"]] == [f"part{i}.jsonl" for i in range(5)]


def test_each_kind_of_change_names_the_first_changed_file(make_cfg, files, write_docs):
    cfg = make_cfg(source=str(files / "*.jsonl"))
    saved = data_fingerprint(cfg)
    with open(files / "part3.jsonl", "a") as fh:
        fh.write('{"text": "doc999: more"}\n')
    assert "data.source " in refusal(saved, cfg) and "file 'part3.jsonl' changed size" in refusal(saved, cfg)
    saved = data_fingerprint(cfg)
    write_docs(files / "part1.jsonl", range(60, 120))  # same bytes, rewritten: only the time differs
    os.utime(files / "part1.jsonl", ns=(1, 1))
    assert "file 'part1.jsonl' was modified (same size" in refusal(saved, cfg)
    saved = data_fingerprint(cfg)
    write_docs(files / "part9.jsonl", range(900, 910))
    assert "file 'part9.jsonl' is new" in refusal(saved, cfg)
    saved = data_fingerprint(cfg)
    (files / "part0.jsonl").unlink()
    message = refusal(saved, cfg)
    assert "file 'part0.jsonl' is gone" in message and "data.allow_changed=true" in message


def test_other_sources_prepared_and_builtin(make_cfg, files, tmp_path):
    cfg = make_cfg(source=str(files / "*.jsonl"), validation_source=str(files / "part0.jsonl"))
    saved = data_fingerprint(cfg)
    assert "data.validation_source" in saved["sources"]
    other = make_cfg(source=f"hf:{files}")
    assert "data.source was files" in refusal(saved, other)
    hf = data_fingerprint(other)["sources"]["data.source"]
    assert hf == {"kind": "hf", "name": f"hf:{files}", "dataset": str(files), "config": None}
    builtin = data_fingerprint(make_cfg(source="builtin"))["sources"]["data.source"]["files"]
    assert len(builtin) > 100 and all(f[2] is None for f in builtin)  # no install-dependent times


def test_prepared_index_hash(make_cfg, files, tokenizers, tmp_path):
    from data.prepare import prepare_shards

    prepare_shards(
        make_cfg(source=str(files / "*.jsonl")), tmp_path / "p", tokenizer=tokenizers["gpt"], num_procs=1
    )
    cfg = make_cfg(source=str(tmp_path / "p"))
    saved = data_fingerprint(cfg)
    assert check_fingerprint(saved, cfg) is None
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    index["skipped"] = {"x": 1}
    (tmp_path / "p" / "index.json").write_text(json.dumps(index))
    assert "prepared shards' index.json" in refusal(saved, cfg)


def test_allow_changed_warns_and_resumes_at_the_saved_positions(make_cfg, files, tokenizers, write_docs):
    cfg = make_cfg(source=str(files / "*.jsonl"))

    def loader(config):
        return build_loader(
            config, objective="clm", tokenizer=tokenizers["gpt"], batch_size=2, rank=0, world_size=2, seed=3
        )

    run = loader(cfg)
    batches = iter(run)
    for _ in range(7):
        next(batches)
    saved, state = data_fingerprint(cfg), run.state_dict()
    write_docs(files / "part5.jsonl", range(300, 360))
    allowed = make_cfg(source=str(files / "*.jsonl"), allow_changed=True)
    warning = check_fingerprint(saved, allowed)
    assert warning.startswith("warning: the data changed since the checkpoint (data.source ")
    assert "file 'part5.jsonl' is new" in warning and "\n" not in warning
    resumed = loader(allowed)
    resumed.load_state_dict(state)
    more = iter(resumed)
    assert all(next(more)["input_ids"].shape == (2, 32) for _ in range(40))  # goes on, into the new file too
