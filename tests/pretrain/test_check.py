"""`pretrain check` refuses, in one line and offline, what would otherwise fail later in the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from pretrain.cli import main
from tests.pretrain.continued import write_run_config
from tests.pretrain.hf_sources import save_source

EXIT_USAGE = 2


@pytest.fixture(scope="module")
def gpt_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_source("gpt", tmp_path_factory.mktemp("source") / "hf-gpt")


def check(capsys, config: Path | str, *overrides: str) -> tuple[int, str, str]:
    code = main(["check", str(config), *overrides])
    out = capsys.readouterr()
    return code, out.out, out.err


def refused(capsys, config: Path | str, *overrides: str) -> str:
    code, _, err = check(capsys, config, *overrides)
    lines = err.splitlines()
    assert code == EXIT_USAGE and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0].removeprefix("error: ")


@pytest.fixture
def tiny(tmp_path: Path) -> list[str]:
    return ["configs/gpt-tiny.yaml", f"run.dir={tmp_path / 'run'}", "wandb.mode=disabled"]


def test_a_missing_tokenizer_directory(capsys, tiny, monkeypatch, tmp_path):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    assert refused(capsys, *tiny, f"data.tokenizer={tmp_path}/nope") == (
        f"data.tokenizer: no such directory: {tmp_path}/nope"
    )


def test_a_source_whose_first_record_lacks_the_field(capsys, tiny, monkeypatch, tmp_path):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"content": "some text"}) + "\n")
    assert refused(capsys, *tiny, f"data.source={path}") == (
        f"data.source: the first record of {path} is unreadable: no field 'text' (set data.text_field)"
    )
    code, out, _ = check(capsys, *tiny, f"data.source={path}", "data.text_field=content")
    assert code == 0 and out.startswith("ok: ")


def test_a_sequence_longer_than_the_positions(capsys, tiny, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    assert refused(capsys, *tiny, "data.seq_len=256") == (
        "data.seq_len: 256 exceeds the model's 128 positions (model.max_seq_len, from model.preset 'gpt-tiny'); "
        "accepted: <= 128"
    )


def test_hub_names_offline(capsys, tiny, monkeypatch):
    """Not in the cache: a note (training downloads it), an error under HF_HUB_OFFLINE=1. No network either way."""
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    code, _, err = check(capsys, *tiny, "data.tokenizer=no-such-org/no-such-tokenizer")
    assert code == 0 and err.startswith(
        "note: data.tokenizer: 'no-such-org/no-such-tokenizer' will be downloaded"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert refused(capsys, *tiny, "data.tokenizer=no-such-org/no-such-tokenizer") == (
        "data.tokenizer: 'no-such-org/no-such-tokenizer' is not usable offline: not a local directory and not in "
        "the local Hugging Face cache"
    )
    assert refused(capsys, *tiny, "data.source=hf:no-such-org/no-such-dataset").startswith(
        "data.source: 'hf:no-such-org/no-such-dataset' is not usable offline"
    )


def test_init_from_refusals(capsys, gpt_source, tmp_path):
    config = write_run_config(tmp_path / "run.yaml", gpt_source, steps=1)
    run_dir = f"run.dir={tmp_path / 'run'}"
    assert refused(capsys, config, run_dir, "model.n_layers=4") == (
        f"model.n_layers: 4 conflicts with model.init_from {gpt_source} (2); its weights have that shape: "
        "remove model.n_layers"
    )
    assert refused(capsys, config, run_dir, f"model.init_from={tmp_path / 'gone'}") == (
        f"model.init_from: no such directory: {tmp_path / 'gone'}"
    )
    broken = tmp_path / "broken"  # its weights lack a tensor the model needs
    shutil.copytree(gpt_source, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["transformer.ln_f.bias"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    assert refused(capsys, config, run_dir, f"model.init_from={broken}") == (
        f"model.init_from: {broken} lacks transformer.ln_f.bias"
    )
    # a tokenizer bigger than the weights' vocabulary: resizing must be asked for
    other = tmp_path / "other"
    other.mkdir()
    from tests.pretrain.hf_sources import tokenizer_for

    tokenizer_for("bert").save_pretrained(other)  # 384 tokens, + <|endoftext|> for a GPT run
    assert refused(capsys, config, run_dir, f"data.tokenizer={other}") == (
        "model.vocab_size: 384 is smaller than the tokenizer's 385 tokens (set model.vocab_size to resize the "
        "embeddings explicitly)"
    )
    code, out, _ = check(capsys, config, run_dir, f"data.tokenizer={other}", "model.vocab_size=385")
    assert code == 0 and out.startswith("ok: ")


def test_an_image_folder_whose_first_file_does_not_decode(capsys, monkeypatch, tmp_path):
    """Image and speech runs: the first file of a folder source decodes (no tokenizer is looked for)."""
    from PIL import Image

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    folder = tmp_path / "images" / "cats"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"not a png")
    run = ["configs/vit-tiny-mae.yaml", f"run.dir={tmp_path / 'run'}", "wandb.mode=disabled"]
    error = refused(capsys, *run, f"data.source={tmp_path / 'images'}")
    assert error.startswith("data.source: cannot decode image a.png#0: cannot identify image file"), error
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "a.png")
    code, out, _ = check(capsys, *run, f"data.source={tmp_path / 'images'}")
    assert code == 0 and out.startswith("ok: ")


def test_prepared_image_shards_through_the_cli(capsys, monkeypatch, tmp_path):
    """`pretrain data prepare` with an image config decodes the folder at the model's prepared size (37 for
    vit-tiny's 32); `pretrain check` accepts the shards for that model and refuses them, in one line, for a
    speech model, a text model and a one-channel ViT."""
    from PIL import Image

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    for i in range(3):
        (tmp_path / "images" / f"c{i}").mkdir(parents=True)
        Image.new("RGB", (48, 40), (80 * i, 10, 10)).save(tmp_path / "images" / f"c{i}" / "a.png")
    run = ["configs/vit-tiny-mae.yaml", f"run.dir={tmp_path / 'run'}", "wandb.mode=disabled"]
    out = tmp_path / "prepared"
    assert main(["data", "prepare", run[0], str(out), f"data.source={tmp_path / 'images'}"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["settings"]["short_side"] == 37 and index["splits"]["train"]["records"] == 3
    capsys.readouterr()
    assert check(capsys, *run, f"data.source={out}")[0] == 0
    conformer = ["configs/conformer-tiny.yaml", f"run.dir={tmp_path / 'run2'}", f"data.source={out}"]
    assert "holds prepared decoded image shards, but this run's model reads audio" in refused(
        capsys, *conformer
    )
    gpt = ["configs/gpt-tiny.yaml", f"run.dir={tmp_path / 'run3'}", f"data.source={out}"]
    assert "holds prepared decoded image shards, but this run's model reads text" in refused(capsys, *gpt)
    assert refused(capsys, *run, f"data.source={out}", "model.num_channels=1") == (
        f"data.source: '{out}' was prepared with 3 channels, the model reads 1; prepare them again with this "
        "run's config"
    )
