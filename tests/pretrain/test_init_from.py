"""`model.init_from`: the architecture read from a transformers directory or one of our runs, refusals in one
line, and continued pretraining end to end (first-step loss = transformers' loss, 0-step export bitwise,
pipelines on the exports, a 2-process ZeRO-3 and FSDP run)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pretrain.config import ConfigError, load_config, resolve_model
from tests.pretrain.continued import (
    first_logged_loss,
    run_cli,
    transformers_first_step_loss,
    write_run_config,
)
from tests.pretrain.hf_sources import POSITIONS, VOCAB, save_source

FAMILIES = ("gpt", "bert", "t5")
LOSS_ATOL = 1e-5  # fp32, same weights and batch; only the kernels' summation order differs


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {family: save_source(family, root / f"hf-{family}") for family in FAMILIES}


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("family", FAMILIES)
def test_architecture_and_tokenizer_come_from_a_transformers_directory(sources, family, tmp_path):
    config = write_run_config(tmp_path / "run.yaml", sources[family], steps=1)
    cfg = load_config(config, [f"run.dir={tmp_path / 'run'}", "model.attention=eager"])
    assert cfg.model.family == family and cfg.objective == {"gpt": "clm", "bert": "mlm", "t5": "span"}[family]
    assert cfg.model.preset is None and cfg.model.config.vocab_size == VOCAB
    assert cfg.model.config.attention == "eager"  # a runtime field may change
    assert cfg.data.tokenizer == str(sources[family])  # its tokenizer, since data.tokenizer is unset
    if family != "t5":
        assert cfg.model.config.max_seq_len == POSITIONS


def test_the_saved_config_outlives_its_source(sources, tmp_path):
    moved = shutil.copytree(sources["t5"], tmp_path / "source")
    section = resolve_model({"init_from": str(moved), "dropout": 0.1, "attention_dropout": 0.1})
    saved = section.to_dict()
    shutil.rmtree(moved)
    again = resolve_model(saved)  # export and resume read config.yaml; the source may be gone by then
    assert again.config == section.config and again.to_dict() == saved


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"d_model": 64}, "model.d_model: 64 conflicts with model.init_from {src} (32); its weights have that "
         "shape: remove model.d_model"),
        ({"max_seq_len": 128}, "model.max_seq_len: 128 conflicts with model.init_from {src} (64)"),
        ({"vocab_size": 100}, "model.vocab_size: 100 conflicts with model.init_from {src} (384)"),
        ({"preset": "gpt-tiny"}, "model.preset: not with model.init_from (the architecture is read from {src}); "
         "remove it"),
        ({"family": "bert"}, "model.family: 'bert', but model.init_from {src} holds a gpt model"),
    ],
)  # fmt: skip
def test_conflicting_fields_are_refused_in_one_line(sources, model, expected):
    with pytest.raises(ConfigError) as e:
        resolve_model({"init_from": str(sources["gpt"]), **model})
    assert str(e.value).startswith(expected.format(src=sources["gpt"])) and "\n" not in str(e.value)


def test_unusable_sources_are_refused_in_one_line(sources, tmp_path):
    cases = {
        tmp_path / "missing": "model.init_from: no such directory: {p}",
        tmp_path: "model.init_from: {p} is neither a transformers directory (config.json) nor a run directory",
    }
    bert_base = shutil.copytree(sources["bert"], tmp_path / "bert-base")
    text = (bert_base / "config.json").read_text().replace('"BertForMaskedLM"', '"BertModel"')
    (bert_base / "config.json").write_text(text)
    cases[bert_base] = "model.init_from: {p} holds BertModel; accepted: BertForMaskedLM"
    for path, expected in cases.items():
        with pytest.raises(ConfigError) as e:
            resolve_model({"init_from": str(path)})
        assert str(e.value).startswith(expected.format(p=path)) and "\n" not in str(e.value)


def test_a_source_without_a_tokenizer_needs_data_tokenizer(sources, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(sources["gpt"] / name, bare / name)
    config = write_run_config(tmp_path / "run.yaml", bare, steps=1)
    with pytest.raises(ConfigError, match=r"^data.tokenizer: model.init_from .* has no tokenizer"):
        load_config(config, check_files=False)
    cfg = load_config(config, [f"data.tokenizer={sources['gpt']}"], check_files=False)
    assert cfg.data.tokenizer == str(sources["gpt"])


# ------------------------------------------------------------------------------ weights, one tensor at a time


def _meta(source: Path, **fields):
    import dataclasses

    from pretrain.components import meta_model

    return meta_model(dataclasses.replace(resolve_model({"init_from": str(source)}).config, **fields))


def _from_hf(source: Path) -> dict[str, torch.Tensor]:
    """What `from_hf` makes of the whole transformers model: the reference for the per-tensor reader."""
    import transformers

    from models.hf import HF_CLASSES, from_hf

    hf_class = getattr(transformers, HF_CLASSES[resolve_model({"init_from": str(source)}).family])
    return from_hf(hf_class.from_pretrained(source, dtype="auto"), attention="eager").state_dict()


def _read(source: Path, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every parameter's starting value as a build asks for it (seeded rows: ones), and the notes."""
    from pretrain.init_from import open_weights

    weights = open_weights(source, model)
    values = {
        name: weights.value(name, p.shape, lambda p=p: torch.ones(p.shape))
        for name, p in model.named_parameters()
    }
    return values, weights.notes


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_are_read_one_tensor_at_a_time_as_from_hf_converts_them(sources, family):
    """GPT-2's Conv1D weights transposed, fused q/k/v and gated projections stacked, tied aliases not read."""
    values, notes = _read(sources[family], _meta(sources[family]))
    _assert_same(values, _from_hf(sources[family]))
    assert notes == []


def _rewrite(source: Path, out: Path, rename: dict[str, str], add: dict[str, torch.Tensor]) -> Path:
    shutil.copytree(source, out)
    state = load_file(source / "model.safetensors")
    state = {rename.get(k, k): v for k, v in state.items()}
    save_file({**state, **add}, str(out / "model.safetensors"))
    return out


def test_older_checkpoint_spellings_are_read_one_tensor_at_a_time(sources, tmp_path):
    """As transformers' own loader accepts them: a GPT-2 saved from its base class (no `transformer.`, the
    causal-mask buffers and the tied head stored), a BERT with LayerNorm gamma/beta and its tied decoder stored."""
    gpt = load_file(sources["gpt"] / "model.safetensors")
    rename = {k: k.removeprefix("transformer.") for k in gpt}
    buffers = {"h.0.attn.bias": torch.ones(1, 1, 4, 4), "lm_head.weight": gpt["transformer.wte.weight"]}
    old_gpt = _rewrite(sources["gpt"], tmp_path / "gpt", rename, buffers)
    bert = load_file(sources["bert"] / "model.safetensors")
    rename = {
        k: k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        for k in bert
    }
    tied = {"cls.predictions.decoder.weight": bert["bert.embeddings.word_embeddings.weight"]}
    old_bert = _rewrite(sources["bert"], tmp_path / "bert", rename, tied)
    for family, old in (("gpt", old_gpt), ("bert", old_bert)):
        values, notes = _read(old, _meta(old))
        _assert_same(values, _from_hf(sources[family]))
        assert notes == []

    untied = {"cls.predictions.decoder.weight": torch.zeros_like(tied["cls.predictions.decoder.weight"])}
    broken = _rewrite(sources["bert"], tmp_path / "untied", {}, untied)
    with pytest.raises(ConfigError) as e:
        _read(broken, _meta(broken))
    assert str(e.value) == (
        f"model.init_from: {broken}: cls.predictions.decoder.weight differs from "
        "bert.embeddings.word_embeddings.weight; this untied variant is not supported"
    )


def test_an_untied_t5_head_is_read_as_transformers_holds_it(tmp_path):
    """T5 v1.1 (gated, own head): transformers >= 5 ties the head anyway and saves only `shared.weight`; an
    older checkpoint stores its own `lm_head.weight`. Either way our head is what from_hf makes of it."""
    import transformers

    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "saved")
    values, _ = _read(tmp_path / "saved", _meta(tmp_path / "saved"))
    _assert_same(values, _from_hf(tmp_path / "saved"))
    assert torch.equal(values["lm_head.weight"], values["embed.tokens.weight"])

    head = torch.randn(VOCAB, 32)
    own = _rewrite(tmp_path / "saved", tmp_path / "own", {}, {"lm_head.weight": head})
    values, _ = _read(own, _meta(own))
    assert torch.equal(values["lm_head.weight"], head)
    assert not torch.equal(values["embed.tokens.weight"], head)


def test_a_sharded_checkpoint_is_read_one_tensor_at_a_time(sources, tmp_path):
    import transformers

    sharded = tmp_path / "sharded"
    hf = transformers.GPT2LMHeadModel.from_pretrained(sources["gpt"])
    hf.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(
        list(sharded.glob("*.safetensors"))
    ) > 1
    values, notes = _read(sharded, _meta(sharded))
    _assert_same(values, _from_hf(sources["gpt"]))
    assert notes == []


def test_a_pytorch_model_bin_is_read_whole_with_a_note(sources, tmp_path):
    source = tmp_path / "bin"
    shutil.copytree(sources["t5"], source)
    torch.save(load_file(source / "model.safetensors"), source / "pytorch_model.bin")
    (source / "model.safetensors").unlink()
    values, notes = _read(source, _meta(source))
    _assert_same(values, _from_hf(sources["t5"]))
    assert notes == [
        f"init_from reads {source} whole on every rank (pytorch_model.bin cannot be read one tensor at a time)"
    ]


def test_a_grown_vocabulary_keeps_the_source_rows_and_the_rest_seeded(sources):
    values, notes = _read(sources["gpt"], _meta(sources["gpt"], vocab_size=VOCAB + 3))
    source = _from_hf(sources["gpt"])["embed.tokens.weight"]
    assert torch.equal(values["embed.tokens.weight"][:VOCAB], source)
    assert torch.equal(values["embed.tokens.weight"][VOCAB:], torch.ones(3, source.shape[1]))
    assert notes == [
        f"init_from resized embed.tokens.weight: {VOCAB} -> {VOCAB + 3} rows (new rows initialised)"
    ]


def test_a_padded_vocabulary_keeps_the_source_rows_in_every_table_with_a_row_per_token(sources):
    """model.vocab_multiple may differ from the source's: BERT's table and head bias get padding rows."""
    values, notes = _read(sources["bert"], _meta(sources["bert"], vocab_multiple=256))
    source = _from_hf(sources["bert"])
    for name in ("embed.tokens.weight", "head.bias"):
        assert values[name].shape[0] == 512 and torch.equal(values[name][:VOCAB], source[name]), name
        assert torch.equal(values[name][VOCAB:], torch.ones(512 - VOCAB, *source[name].shape[1:])), name
    assert notes == [
        f"init_from resized {name}: {VOCAB} -> 512 rows (new rows initialised)"
        for name in ("embed.tokens.weight", "head.bias")
    ]


def test_weights_that_do_not_fit_the_model_are_refused_in_one_line(sources, tmp_path):
    from pretrain.init_from import open_weights

    source = sources["gpt"]
    with pytest.raises(ConfigError) as e:
        open_weights(source, _meta(source, d_model=64))
    assert str(e.value) == (
        f"model.init_from: embed.tokens.weight has shape ({VOCAB}, 32) in {source}, ({VOCAB}, 64) in this run's model"
    )
    run = tmp_path / "run"
    (run / "checkpoints/step_0").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model:\n  init_from: {source}\n")
    state = _from_hf(source)
    del state["norm.bias"]
    save_file(state, str(run / "checkpoints/step_0/model.safetensors"))
    checkpoint = run / "checkpoints/step_0"
    with pytest.raises(ConfigError) as e:
        open_weights(checkpoint, _meta(source))
    assert str(e.value) == f"model.init_from: {checkpoint} lacks norm.bias"


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def zero_step(sources, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Per family: (run directory, export) of a run that trained 0 steps from the source."""
    out = {}
    for family, source in sources.items():
        root = tmp_path_factory.mktemp(f"zero-{family}")
        run_cli(
            "train", str(write_run_config(root / "zero.yaml", source, steps=0)), f"run.dir={root / 'run'}"
        )
        run_cli("export", str(root / "run"), str(root / "export"))
        out[family] = (root / "run", root / "export")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_continued_pretraining_end_to_end(sources, zero_step, family, tmp_path):
    """0 steps: the export is the source, bitwise, in the same class. 1 step: its loss is transformers'."""
    source, exported_dir = sources[family], zero_step[family][1]
    original, exported = (
        load_file(source / "model.safetensors"),
        load_file(exported_dir / "model.safetensors"),
    )
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original), "0-step export is not bitwise"
    assert _architectures(exported_dir) == _architectures(source)

    one = write_run_config(tmp_path / "one.yaml", source, steps=1)
    overrides = [f"run.dir={tmp_path / 'one'}"]
    run_cli("train", str(one), *overrides)
    ours, theirs = first_logged_loss(tmp_path / "one"), transformers_first_step_loss(one, overrides)
    assert abs(ours - theirs) < LOSS_ATOL, (ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["engine.deepspeed.zero_stage=3", "engine.backend=fsdp"])
def test_two_process_sharded_continued_run(sources, engine, tmp_path):
    """ZeRO-3 and FSDP on 2 processes (gloo): the source's weights reach every shard (the loss says so)."""
    config = write_run_config(tmp_path / "run.yaml", sources["gpt"], steps=1)
    overrides = [f"run.dir={tmp_path / 'run'}", engine]
    run_cli("launch", "local", "--nproc", "2", str(config), *overrides)
    ours = first_logged_loss(tmp_path / "run")
    theirs = transformers_first_step_loss(config, overrides, world_size=2)
    assert abs(ours - theirs) < LOSS_ATOL, (ours, theirs)


def _architectures(path: Path) -> list[str]:
    import json

    return json.loads((path / "config.json").read_text())["architectures"]


@pytest.mark.slow
def test_a_second_phase_starts_from_a_run_directory(sources, tmp_path):
    """A run directory (its newest checkpoint) or one checkpoint as init_from: weights only, new schedule."""
    first = write_run_config(tmp_path / "first.yaml", sources["gpt"], steps=2)
    run_cli("train", str(first), f"run.dir={tmp_path / 'first'}")
    second = write_run_config(tmp_path / "second.yaml", tmp_path / "first", steps=0)
    cfg = load_config(second, [f"run.dir={tmp_path / 'second'}"])
    assert cfg.model.config.d_model == 32 and cfg.data.tokenizer == str(tmp_path / "first/tokenizer")
    run_cli("train", str(second), f"run.dir={tmp_path / 'second'}")
    before = load_file(tmp_path / "first/checkpoints/step_2/model.safetensors")
    after = load_file(tmp_path / "second/checkpoints/step_0/model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    checkpoint = tmp_path / "first/checkpoints/step_2"
    assert resolve_model({"init_from": str(checkpoint)}).config == cfg.model.config


@pytest.mark.slow
def test_a_padded_vocabulary_is_recorded_and_left_out_where_it_does_not_belong(sources, tmp_path):
    """A run with model.vocab_multiple pads its tables; its checkpoint records the real vocabulary, so a second
    phase without padding reads the source's rows back, and the export has transformers' vocabulary."""
    from safetensors import safe_open

    first = write_run_config(tmp_path / "first.yaml", sources["t5"], steps=1)
    notes = run_cli("train", str(first), f"run.dir={tmp_path / 'first'}", "model.vocab_multiple=256")
    assert f"note: init_from resized embed.tokens.weight: {VOCAB} -> 512 rows" in notes
    checkpoint = tmp_path / "first/checkpoints/step_1"
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"vocab_size": str(VOCAB)}
        assert f.get_slice("embed.tokens.weight").get_shape()[0] == 512
    second = write_run_config(tmp_path / "second.yaml", tmp_path / "first", steps=0)
    cfg = load_config(second, [f"run.dir={tmp_path / 'second'}", "model.vocab_multiple=1"])
    assert cfg.model.config.vocab_size == VOCAB and cfg.model.config.padded_vocab_size == VOCAB
    notes = run_cli("train", str(second), f"run.dir={tmp_path / 'second'}", "model.vocab_multiple=1")
    assert (
        f"note: init_from resized embed.tokens.weight: 512 -> {VOCAB} rows (padding rows left out)" in notes
    )
    before = load_file(checkpoint / "model.safetensors")
    after = load_file(tmp_path / "second/checkpoints/step_0/model.safetensors")
    assert all(torch.equal(before[k][: after[k].shape[0]], after[k]) for k in before)
    run_cli("export", str(tmp_path / "first"), str(tmp_path / "export"))  # checks the logits on its own
    exported = load_file(tmp_path / "export/model.safetensors")["shared.weight"]
    assert torch.equal(exported, before["embed.tokens.weight"][:VOCAB])


# ------------------------------------------------------------------------------- exports through pipelines


def _ours(run_dir: Path):
    from pretrain.export import load_run_model, read_run_config

    model, tokenizer, _ = load_run_model(run_dir, read_run_config(run_dir))
    return model, tokenizer


@pytest.mark.slow
def test_fill_mask_pipeline_on_a_bert_export(zero_step):
    import transformers

    run_dir, exported = zero_step["bert"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert tokenizer.model_max_length == POSITIONS
    pair = tokenizer("def main(args):", "return args")
    assert pair["token_type_ids"][-1] == 1 and pair["token_type_ids"][0] == 0  # [CLS] A [SEP] B [SEP]
    assert pair["input_ids"][0] == tokenizer.cls_token_id and pair["input_ids"][-1] == tokenizer.sep_token_id

    text = f"def main({tokenizer.mask_token}):"
    found = transformers.pipeline("fill-mask", model=str(exported))(text, top_k=3)
    model, _ = _ours(run_dir)
    inputs = tokenizer(text, return_tensors="pt")
    where = inputs["input_ids"][0].tolist().index(tokenizer.mask_token_id)
    with torch.no_grad():
        probs = model(**inputs).logits[0, where].softmax(-1)
    top = probs.topk(3)
    assert [r["token"] for r in found] == top.indices.tolist()
    assert [r["score"] for r in found] == pytest.approx(top.values.tolist(), abs=1e-5)


@pytest.mark.slow
def test_text_generation_pipeline_on_a_gpt_export_truncates_a_long_prompt(zero_step):
    import transformers

    run_dir, exported = zero_step["gpt"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert (tokenizer.model_max_length, tokenizer.truncation_side) == (POSITIONS, "left")
    generation = transformers.GenerationConfig.from_pretrained(exported)
    assert generation.pad_token_id == generation.eos_token_id == tokenizer.eos_token_id  # GPT-2 style
    prompt = "import os\nimport sys\n" * 40
    assert len(tokenizer(prompt)["input_ids"]) > POSITIONS
    new = 8
    pipe = transformers.pipeline("text-generation", model=str(exported))
    out = pipe(prompt, truncation=True, handle_long_generation="hole", max_new_tokens=new, do_sample=False)
    generated = out[0]["generated_text"][len(prompt) :]

    model, _ = _ours(run_dir)  # greedy decoding with our model on the same window: the prompt's end
    ids = torch.tensor([tokenizer(prompt)["input_ids"][-(POSITIONS - new) :]])
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert generated == tokenizer.decode(ids[0, -new:])


@pytest.mark.slow
def test_t5_export_fills_sentinels_like_our_model(zero_step):
    """transformers 5 removed the text2text-generation pipeline; `generate` is what it ran."""
    import transformers

    run_dir, exported = zero_step["t5"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(exported).eval()
    text = "def <extra_id_0>(self): return <extra_id_1>"
    inputs = tokenizer(text, return_tensors="pt")
    assert (
        "token_type_ids" not in inputs
        and tokenizer.convert_tokens_to_ids("<extra_id_0>") in inputs["input_ids"]
    )
    assert inputs["input_ids"][0, -1] == tokenizer.eos_token_id
    theirs = hf.generate(**inputs, max_new_tokens=6, do_sample=False)[0].tolist()

    model, _ = _ours(run_dir)
    decoded = torch.tensor([[hf.generation_config.decoder_start_token_id]])
    assert decoded.item() == tokenizer.pad_token_id
    with torch.no_grad():
        for _ in range(6):
            logits = model(**inputs, decoder_input_ids=decoded).logits
            decoded = torch.cat([decoded, logits[:, -1:].argmax(-1)], dim=1)
            if decoded[0, -1] == tokenizer.eos_token_id:
                break
    assert theirs == decoded[0].tolist()


# ------------------------------------------------------------------------------------- pretrain sample


def _sample_cli(run_dir: Path, *args: str) -> list[str]:
    import subprocess
    import sys

    from tests.pretrain.continued import clean_env

    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "sample", str(run_dir), *args],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == f"# {run_dir / 'checkpoints' / 'step_0'}"
    return lines[1:]


@pytest.mark.slow
def test_pretrain_sample_is_what_transformers_generates(zero_step):
    """From the checkpoint directly: the same greedy text as transformers on the (bitwise equal) export."""
    import transformers

    for family, prompt in (("gpt", "def main("), ("t5", "def <extra_id_0>(self): return <extra_id_1>")):
        run_dir, exported = zero_step[family]
        tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
        auto = transformers.AutoModelForCausalLM if family == "gpt" else transformers.AutoModelForSeq2SeqLM
        hf = auto.from_pretrained(exported).eval()
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=family == "t5")
        ids = hf.generate(**inputs, max_new_tokens=6, do_sample=False)[0]
        new = ids[inputs["input_ids"].shape[1] :] if family == "gpt" else ids[1:]
        expected = tokenizer.decode(new, skip_special_tokens=False)
        assert _sample_cli(run_dir, "--prompt", prompt, "--max-new-tokens", "6") == [
            f"{prompt!r} -> {expected!r}"
        ]

    run_dir, exported = zero_step["bert"]
    fill = transformers.pipeline("fill-mask", model=str(exported))
    found = fill("def main([MASK]):", top_k=3)
    options = ", ".join(f"{r['token_str']!r} {r['score']:.3f}" for r in found)
    expected = f"[MASK]0: {options}"
    assert _sample_cli(run_dir, "--top-k", "3") == [f"{'def main([MASK]):'!r} -> {expected!r}"]


def test_eval_samples_for_bert_need_a_mask(sources, tmp_path):
    config = write_run_config(tmp_path / "run.yaml", sources["bert"], steps=1)
    with pytest.raises(ConfigError, match=r"^eval.samples\[1\]: a BERT prompt needs \[MASK\]"):
        load_config(config, ['eval.samples=["a [MASK] b", "no mask"]'], check_files=False)


@pytest.mark.slow
def test_eval_samples_are_what_pretrain_sample_reads_from_the_checkpoint(sources, tmp_path):
    """At an evaluation step the run writes samples.jsonl; the same step's checkpoint samples the same text."""
    import json

    config = write_run_config(tmp_path / "run.yaml", sources["gpt"], steps=1)
    prompts = ["def main(", "import os\n"]
    run_cli(
        "train",
        str(config),
        f"run.dir={tmp_path / 'run'}",
        "train.eval_every=1",
        "train.eval_batches=1",
        f"eval.samples={json.dumps(prompts)}",
        "eval.max_new_tokens=6",
    )
    written = [json.loads(line) for line in (tmp_path / "run/samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in written] == [(1, p) for p in prompts]
    from pretrain.sample import sample_run

    _, samples = sample_run(tmp_path / "run", prompts, step=1, max_new_tokens=6)
    assert [r["output"] for r in written] == [s.output for s in samples]


@pytest.mark.slow
def test_a_continued_run_resumes_after_its_source_is_gone(sources, tmp_path):
    source = shutil.copytree(sources["gpt"], tmp_path / "source")
    config = write_run_config(tmp_path / "run.yaml", source, steps=1)
    run_cli("train", str(config), f"run.dir={tmp_path / 'run'}")
    shutil.rmtree(source)  # the run's config.yaml holds the architecture, its checkpoint the weights
    notes = run_cli("train", str(tmp_path / "run/config.yaml"), "train.max_steps=2")
    assert "resuming at step 1" in notes


@pytest.mark.slow
def test_an_explicit_vocabulary_resize_keeps_the_source_rows_and_exports(sources, tmp_path):
    """A tokenizer one token larger than the weights: model.vocab_size grows the tables, the source fills the first
    rows, and the export has the new size."""
    from tests.pretrain.hf_sources import tokenizer_for

    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_for("bert").save_pretrained(tokenizer_dir)  # + <|endoftext|> for a GPT run: VOCAB + 1 tokens
    config = write_run_config(tmp_path / "run.yaml", sources["gpt"], steps=0)
    overrides = [
        f"run.dir={tmp_path / 'run'}",
        f"data.tokenizer={tokenizer_dir}",
        f"model.vocab_size={VOCAB + 1}",
    ]
    notes = run_cli("train", str(config), *overrides)
    assert f"note: init_from resized embed.tokens.weight: {VOCAB} -> {VOCAB + 1} rows" in notes
    run_cli("export", str(tmp_path / "run"), str(tmp_path / "export"))
    source = load_file(sources["gpt"] / "model.safetensors")["transformer.wte.weight"]
    exported = load_file(tmp_path / "export/model.safetensors")["transformer.wte.weight"]
    assert exported.shape[0] == VOCAB + 1 and torch.equal(exported[:VOCAB], source)
