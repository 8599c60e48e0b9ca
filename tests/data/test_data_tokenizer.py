"""Tokenizer training, special tokens per family, round trip, reload and loading from a path."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from data import DataConfig, DataError, build_tokenizer
from data.tokenizer import Encoder


def test_trained_size_and_round_trip(tmp_path):
    cfg = DataConfig(source="builtin", vocab_size=600, tokenizer_train_chars=100_000)
    tok = build_tokenizer(cfg, family="gpt", out_dir=tmp_path / "tok")
    assert len(tok) == 600
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓ 中文\n"
    ids = Encoder(tok)(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode())
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")  # a plain transformers tokenizer
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids.tolist()


def test_family_special_tokens(tokenizers):
    gpt, bert, t5 = tokenizers["gpt"], tokenizers["bert"], tokenizers["t5"]
    assert (gpt.bos_token, gpt.eos_token, gpt.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert gpt.pad_token_id != gpt.eos_token_id
    assert [
        bert.pad_token_id,
        bert.unk_token_id,
        bert.cls_token_id,
        bert.sep_token_id,
        bert.mask_token_id,
    ] == [0, 1, 2, 3, 4]
    assert (
        bert("a b")["input_ids"][0] == bert.cls_token_id and bert("a b")["input_ids"][-1] == bert.sep_token_id
    )
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    sentinels = t5.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    assert len(set(sentinels)) == 100 and t5.unk_token_id not in sentinels
    assert t5("a b")["input_ids"][-1] == t5.eos_token_id
    # special tokens are never produced from text: "[MASK]" typed in a document is just characters
    assert bert.mask_token_id not in Encoder(bert)("x [MASK] y").tolist()


def test_existing_tokenizer_is_reloaded_not_retrained(make_cfg, tmp_path):
    out = tmp_path / "tok"
    first = build_tokenizer(make_cfg(), family="bert", out_dir=out)
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    again = build_tokenizer(make_cfg(vocab_size=2000), family="bert", out_dir=out)  # the saved one wins
    assert again.get_vocab() == first.get_vocab() and (out / "tokenizer.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="lacks the t5 special tokens"):
        build_tokenizer(make_cfg(), family="t5", out_dir=out)


def test_load_from_path_adds_the_family_tokens(tokenizers, make_cfg, tmp_path):
    tokenizers["gpt"].save_pretrained(tmp_path / "gpt")
    bert = build_tokenizer(make_cfg(tokenizer=str(tmp_path / "gpt")), family="bert", out_dir=tmp_path / "run")
    assert {bert.cls_token, bert.sep_token, bert.mask_token} == {"[CLS]", "[SEP]", "[MASK]"}
    assert len(bert) == len(tokenizers["gpt"]) + 4  # [UNK] [CLS] [SEP] [MASK] appended
    assert bert.pad_token == "<|pad|>"  # an existing special token is kept
    assert (tmp_path / "run" / "tokenizer.json").exists()


def test_unknown_tokenizer_is_a_clear_error(make_cfg, tmp_path):
    with pytest.raises(DataError, match="data.tokenizer: no such directory: /nonexistent/tok"):
        build_tokenizer(make_cfg(tokenizer="/nonexistent/tok"), family="gpt", out_dir=tmp_path / "t")
    with pytest.raises(ValueError, match="family: 'llama'"):
        build_tokenizer(make_cfg(), family="llama", out_dir=tmp_path / "t")


def test_gpt2_style_tokenizer_pads_with_eos_and_keeps_its_vocabulary(make_cfg, tmp_path):
    from tests.pretrain.hf_sources import gpt2_style_tokenizer

    source = gpt2_style_tokenizer()
    assert source.pad_token is None
    source.save_pretrained(tmp_path / "gpt2")
    loaded = build_tokenizer(
        make_cfg(tokenizer=str(tmp_path / "gpt2")), family="gpt", out_dir=tmp_path / "run"
    )
    assert len(loaded) == len(source)  # nothing added: the embeddings of the weights still fit
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"
    again = build_tokenizer(make_cfg(), family="gpt", out_dir=tmp_path / "run")  # the saved copy, strict
    assert again.pad_token_id == source.eos_token_id
