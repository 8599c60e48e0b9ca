"""Tiny `transformers` directories (random init, `save_pretrained`, no downloads) to continue pretraining from.

Each holds a model of the family's pretraining class and a tokenizer as such checkpoints ship them: GPT-2
style without a pad token (EOS pads), BERT with [CLS]/[SEP]/[MASK] and a pair template, T5 with sentinels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data.config import DataConfig
from data.corpus import builtin_files
from data.tokenizer import train_tokenizer
from models.hf import HF_CLASSES

VOCAB = 384
POSITIONS = 64


def gpt2_style_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with only <|endoftext|> (bos = eos, no pad), like the published GPT-2 tokenizer."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([p.read_text(errors="replace") for p in builtin_files()[:40]], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def tokenizer_for(family: str) -> PreTrainedTokenizerFast:
    if family == "gpt":
        return gpt2_style_tokenizer()
    cfg = DataConfig(source="builtin", vocab_size=VOCAB, tokenizer_train_chars=100_000)
    return train_tokenizer(cfg, family=family)


def hf_model(family: str, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    """A randomly initialised model of the family's pretraining class, dropout off (exact loss comparisons)."""
    import transformers

    torch.manual_seed(0)
    vocab = len(tokenizer)
    if family == "gpt":
        cfg = transformers.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=POSITIONS,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    elif family == "bert":
        cfg = transformers.BertConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=POSITIONS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    else:
        cfg = transformers.T5Config(
            vocab_size=vocab, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    return getattr(transformers, HF_CLASSES[family])(cfg).eval()


def save_source(family: str, out_dir: Path) -> Path:
    """A transformers directory (model + tokenizer) for `family`; returns it."""
    tokenizer = tokenizer_for(family)
    hf_model(family, tokenizer).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
