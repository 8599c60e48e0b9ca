"""Run config: precedence, round trip, mapping to component specs, and every bad input as one clear line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.cli import main
from pretrain.config import ConfigError, load_config
from pretrain.loop import train
from tests.common import REPO
from tests.pretrain.helpers import write_yaml
from tests.pretrain.pretrain_fakes import save_steps

BASE = """\
model:
  preset: gpt-tiny
  n_layers: 2
train:
  lr: 0.01
  max_steps: 50
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "run.yaml", BASE)


def test_precedence_defaults_file_command_line(config: Path) -> None:
    cfg = load_config(config, ["train.lr=0.02", "engine.deepspeed.zero_stage=1", "model.d_model=64"])
    assert cfg.train.lr == 0.02  # command line beats file
    assert cfg.train.max_steps == 50  # file beats default
    assert cfg.train.micro_batch_size == 8 and cfg.train.eps == 1e-8  # defaults
    assert cfg.engine.deepspeed.zero_stage == 1
    assert cfg.model.given == {"n_layers": 2, "d_model": 64}
    assert (cfg.model.config.n_layers, cfg.model.config.d_model, cfg.model.config.n_heads) == (2, 64, 4)
    assert cfg.objective == "clm"  # from the family
    assert cfg.run.dir == Path("runs/run")  # from the file name


def test_resolved_config_round_trips(config: Path, tmp_path: Path) -> None:
    cfg = load_config(config, ["data.seq_len=64", "train.clip_grad=null", "run.dir=" + str(tmp_path / "r")])
    saved = write_yaml(tmp_path / "resolved.yaml", cfg.to_yaml())
    assert load_config(saved) == cfg
    assert cfg.train.clip_grad is None


def test_maps_to_component_specs(config: Path) -> None:
    cfg = load_config(config, ["train.grad_accum=4", "train.precision=bf16", "engine.backend=fsdp"])
    spec, optim, data = cfg.engine_spec, cfg.optimizer, cfg.data
    assert (spec.grad_accum, spec.precision, spec.backend, spec.micro_batch_size) == (4, "bf16", "fsdp", 8)
    assert spec.fsdp is not None and spec.deepspeed is None and spec.deepspeed_json is None
    assert cfg.engine_spec is spec  # resolved once
    assert (optim.lr, optim.max_steps, optim.clip_grad) == (0.01, 50, 1.0)
    assert (data.source, data.seq_len) == ("builtin", 128)


def test_mixture_source(tmp_path: Path) -> None:
    corpus = tmp_path / "a.txt"
    corpus.write_text("hello world\n")
    cfg = load_config(
        write_yaml(
            tmp_path / "m.yaml",
            BASE + f"data:\n  source:\n    - {{source: builtin, weight: 2}}\n    - {{source: '{corpus}'}}\n",
        )
    )
    assert [(c.source, c.weight) for c in cfg.data.components] == [
        ("builtin", 2),
        (str(corpus), 1.0),
    ]


def ds_json(tmp_path: Path, text: str) -> str:
    return str(write_yaml(tmp_path / "ds.json", text))


# (config text or None for BASE, overrides, words the one-line message must contain)
BAD = {
    "missing file": ("MISSING", [], ["not found", "nope.yaml"]),
    "not yaml": ("model: [unclosed\n", [], ["not valid YAML", "line"]),
    "not a mapping": ("- a\n- b\n", [], ["mapping", "list"]),
    "empty": ("", [], ["mapping", "empty"]),
    "unknown section": (None, ["trian.lr=1"], ["trian", "did you mean train"]),
    "unknown key": (None, ["train.max_stesp=3"], ["train.max_stesp", "did you mean train.max_steps"]),
    "unknown model field": (None, ["model.n_layer=3"], ["model.n_layer", "did you mean model.n_layers"]),
    "override without =": (None, ["train.lr"], ["train.lr", "key.path=value"]),
    "override into a value": (None, ["train.lr.x=1"], ["train.lr", "not a section"]),
    "wrong type": (None, ["train.max_steps=ten"], ["train.max_steps", "integer", "ten"]),
    "wrong model type": (None, ["model.n_heads=many"], ["model.n_heads", "integer"]),
    "negative steps": (None, ["train.max_steps=-5"], ["train.max_steps", "greater than or equal to 0", "-5"]),
    "zero batch": (None, ["train.micro_batch_size=0"], ["train.micro_batch_size", "greater than 0"]),
    "zero seq_len": (None, ["data.seq_len=0"], ["data.seq_len", "integer >= 8", "got 0"]),
    "zero stage": (
        None,
        ["engine.deepspeed.zero_stage=4"],
        ["engine.deepspeed.zero_stage", "less than or equal to 3"],
    ),
    "renamed stage key": (
        None,
        ["engine.zero_stage=1"],
        ["engine.zero_stage", "engine.deepspeed.zero_stage"],
    ),
    "renamed ds json key": (None, ["engine.deepspeed_config=x.json"], ["engine.deepspeed.config"]),
    "renamed accelerate backend": (None, ["engine.backend=accelerate"], ["engine.backend=ddp", "fsdp"]),
    "renamed accelerate strategy": (
        None,
        ["engine.accelerate.strategy=fsdp"],
        ["engine.accelerate.strategy", "engine.backend=fsdp"],
    ),
    "setting for another engine": (
        None,
        ["engine.backend=ddp", "engine.deepspeed.zero_stage=1"],
        ["engine.deepspeed.zero_stage", "engine.backend=ddp does not use it"],
    ),
    "fsdp setting on deepspeed": (
        None,
        ["engine.fsdp.reshard_after_forward=false"],
        ["engine.fsdp.reshard_after_forward", "engine.backend=deepspeed does not use it"],
    ),
    "unknown preset": (None, ["model.preset=gpt3"], ["model.preset", "gpt3", "gpt-tiny"]),
    "text setting with an image preset": (
        None,
        ["model.preset=vit-tiny-mae", "data.seq_len=64"],
        ["data.seq_len", "'vit-tiny-mae' is an image model (objective mae)", "does not use it"],
    ),
    "text source with an image preset": (
        None,
        ["model.preset=vit-tiny-simmim", f"data.source={REPO}/configs/*.yaml"],
        ["data.source", "holds no image files", ".png"],
    ),
    "image setting with a speech preset": (
        None,
        ["model.preset=conformer-tiny", "data.mask_ratio=0.5"],
        ["data.mask_ratio", "'conformer-tiny' is a speech model (objective bestrq)"],
    ),
    "speech setting with a text preset": (
        None,
        ["data.clip_seconds=1.5"],
        ["data.clip_seconds", "'gpt-tiny' is a text model"],
    ),
    "prompts for an image model": (
        None,
        ["model.preset=vit-tiny-mae", "eval.samples=[a prompt]"],
        ["eval.samples", "an image model"],
    ),
    "bestrq on vit": (
        None,
        ["model.preset=vit-tiny-mae", "objective=bestrq"],
        ["objective", "vit_mae", "accepted: 'mae'"],
    ),
    "unknown attention": (None, ["model.attention=flash"], ["model.attention", "flash", "chunked"]),
    "unknown objective": (
        None,
        ["objective=lm"],
        ["objective", "'clm', 'mlm', 'span', 'mae', 'simmim' or 'bestrq'", "got 'lm'"],
    ),
    "unknown engine": (None, ["engine.backend=megatron"], ["engine.backend", "'deepspeed', 'ddp' or 'fsdp'"]),
    "clm on bert": (
        None,
        ["model.preset=bert-tiny", "model.n_layers=1", "objective=clm"],
        ["objective", "bert", "'mlm'"],
    ),
    "mlm on t5": (None, ["model.preset=t5-tiny", "objective=mlm"], ["objective", "t5", "'span'"]),
    "span on gpt": (None, ["objective=span"], ["objective", "gpt", "'clm'"]),
    "glob matches nothing": (
        None,
        ["data.source=/nonexistent/dir/*.jsonl"],
        ["data.source", "matches no files"],
    ),
    "online without key": (None, ["wandb.mode=online"], ["wandb.mode", "key", "offline"]),
    "ds json missing": (
        None,
        ["engine.deepspeed.config=/nonexistent.json"],
        ["engine.deepspeed.config", "nonexistent.json"],
    ),
    "ds json invalid": (None, ["DSJSON:{not json"], ["engine.deepspeed.config", "not valid JSON"]),
    "ds json conflict": (
        None,
        ['DSJSON:{"train_micro_batch_size_per_gpu": 4}'],
        ["train_micro_batch_size_per_gpu", "train.micro_batch_size"],
    ),
    "ds stage conflict": (
        None,
        ['DSJSON:{"zero_optimization": {"stage": 3}}'],
        ["zero_optimization.stage", "engine.deepspeed.zero_stage"],
    ),
    "offload needs stage": (
        None,
        ["engine.deepspeed.offload=params"],
        ["engine.deepspeed.offload", "zero_stage=3"],
    ),
    "compile with zero-3": (
        None,
        ["train.compile=true", "engine.deepspeed.zero_stage=3"],
        ["train.compile", "zero_stage"],
    ),
    "compile with fsdp": (
        None,
        ["train.compile=true", "engine.backend=fsdp"],
        ["train.compile", "fsdp"],
    ),
    "reversible with zero-3": (
        None,
        ["model.reversible=true", "engine.deepspeed.zero_stage=3"],
        ["model.reversible", "zero_stage"],
    ),
    "reversible with fsdp": (
        None,
        ["model.reversible=true", "engine.backend=fsdp"],
        ["model.reversible", "fsdp"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    text, overrides, words = BAD[case]
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc W&B login
    path = (
        tmp_path / "nope.yaml"
        if text == "MISSING"
        else write_yaml(tmp_path / "c.yaml", BASE if text is None else text)
    )
    overrides = [
        f"engine.deepspeed.config={ds_json(tmp_path, o.removeprefix('DSJSON:'))}"
        if o.startswith("DSJSON:")
        else o
        for o in overrides
    ]
    assert main(["train", str(path), *overrides]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)
    with pytest.raises(ConfigError):  # the same problem from the library API
        load_config(path, overrides)


@pytest.mark.parametrize(
    ("preset", "objective", "unit_setting"),
    [("vit-tiny-mae", "mae", "crop_scale"), ("swin-tiny-simmim", "simmim", "mask_ratio"),
     ("conformer-tiny", "bestrq", "clip_seconds")],
)  # fmt: skip
def test_media_presets_resolve_without_text_settings(
    preset: str, objective: str, unit_setting: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The objective follows the family; `pretrain config` lists the data keys that objective reads, and none of
    text's (no tokenizer, no seq_len)."""
    path = write_yaml(tmp_path / "media.yaml", f"model: {{preset: {preset}}}\n")
    cfg = load_config(path)
    assert cfg.objective == objective and cfg.modality == ("audio" if objective == "bestrq" else "image")
    assert main(["config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"objective: {objective}" in out and f"data.{unit_setting}:" in out
    assert "data.seq_len" not in out and "data.tokenizer" not in out and "from the tokenizer" not in out


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["trian", "x.yaml"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "train" in err


def test_export_and_plot_without_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text(load_config(write_yaml(tmp_path / "c.yaml", BASE)).to_yaml())
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint under" in err and err.count("\n") == 1
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


T5_TWO_DROPOUTS = ["model.preset=t5-tiny", "model.dropout=0.1", "model.attention_dropout=0.0"]
T5_EXPORT_PROBLEM = (
    "transformers' T5 has one dropout_rate, but model.dropout=0.1 and model.attention_dropout=0.0"
)


def test_t5_with_two_dropout_rates_trains_with_a_warning(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    cfg = load_config(config, [*T5_TWO_DROPOUTS, "train.max_steps=2", f"run.dir={run_dir}"])
    warning = f"{T5_EXPORT_PROBLEM}, so `pretrain export` will refuse this run; set both to the same value"
    assert cfg.warnings() == [warning]
    assert load_config(config, ["model.preset=t5-tiny", "model.attention_dropout=0.0"]).warnings() == []
    assert (
        load_config(config, ["model.preset=bert-tiny", *T5_TWO_DROPOUTS[1:]]).warnings() == []
    )  # BERT has both
    # `pretrain train` says it first; on a finished run, which builds nothing else.
    save_steps(run_dir / "checkpoints", [2])
    assert train(cfg).step == 2
    lines = capsys.readouterr().err.splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines), lines  # console lines carry the time
    assert [line[9:] for line in lines] == [
        f"warning: {warning}",
        f"{run_dir}: already trained to step 2 (train.max_steps=2)",
    ]


def test_export_refuses_t5_with_two_dropout_rates_in_one_line(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        load_config(config, [*T5_TWO_DROPOUTS, f"run.dir={run_dir}"]).to_yaml()
    )
    save_steps(run_dir / "checkpoints", [2])  # a checkpoint exists: the refusal comes before it is read
    assert main(["export", str(run_dir), str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == (
        f"error: export: {run_dir} cannot be converted to transformers: {T5_EXPORT_PROBLEM}; dropout does not "
        f"change trained weights, so set both to one value in {run_dir / 'config.yaml'} and export again\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.yaml"]  # no OUT_DIR, no staging


@pytest.mark.slow
def test_cli_process_exit_code_and_no_traceback() -> None:
    """The real entry point (`python -m pretrain`): exit 2, one line, no traceback; --debug shows one."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    args = [sys.executable, "-m", "pretrain", "train", "configs/gpt-tiny.yaml", "train.max_stesp=1"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "did you mean train.max_steps" in proc.stderr and "Traceback" not in proc.stderr
    debug = subprocess.run(
        [*args[:3], "--debug", *args[3:]], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_shipped_configs_validate() -> None:
    names = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert {"gpt-tiny.yaml", "bert-tiny.yaml", "t5-tiny.yaml"} <= set(names)
    old = os.getcwd()
    os.chdir(REPO)
    try:
        objectives = {name: load_config(REPO / "configs" / name).objective for name in names}
    finally:
        os.chdir(old)
    assert objectives["bert-tiny.yaml"] == "mlm" and objectives["t5-tiny.yaml"] == "span"
    json.dumps(objectives)


def test_error_line_never_shows_a_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "fake-key-0123456789abcdef")
    assert (
        main(["train", str(write_yaml(tmp_path / "c.yaml", BASE)), "train.lr=fake-key-0123456789abcdef"]) == 2
    )
    err = capsys.readouterr().err
    assert "train.lr" in err and "fake-key" not in err and "***" in err
