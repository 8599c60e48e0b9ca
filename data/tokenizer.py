"""Tokenizers: train a byte-level BPE on the source, or load one; either way with the family's special tokens.

The result is saved as a `transformers` PreTrainedTokenizerFast in the run directory, so a resumed run
(and an exported model) uses exactly the same tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data.config import DataConfig
from data.errors import DataError
from data.shards import PREPARED_INDEX
from data.sources import resolve_source

NUM_SENTINELS = 100
SENTINELS = [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)]
FAMILY_TOKENS: dict[str, dict[str, str]] = {
    "gpt": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"},
    "bert": {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    },
    "t5": {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
}


def family_special_tokens(family: str) -> list[str]:
    """The family's special tokens in id order (ids 0, 1, ... in a tokenizer we train)."""
    if family not in FAMILY_TOKENS:
        raise ValueError(f"family: {family!r} is not one of {', '.join(FAMILY_TOKENS)}")
    tokens = list(dict.fromkeys(FAMILY_TOKENS[family].values()))
    return tokens + SENTINELS if family == "t5" else tokens


def build_tokenizer(cfg: DataConfig, *, family: str, out_dir: Path) -> PreTrainedTokenizerFast:
    """The run's tokenizer: reloaded from out_dir if it holds one, else trained or loaded, then saved there."""
    family_special_tokens(family)  # validates the family
    out_dir = Path(out_dir)
    if (out_dir / "tokenizer.json").exists():
        return _with_family_tokens(_load(str(out_dir)), family, str(out_dir), strict=True)
    if cfg.tokenizer is not None:
        tokenizer = _with_family_tokens(_load(cfg.tokenizer), family, cfg.tokenizer, strict=False)
    elif (prepared := _prepared_tokenizer_dir(cfg)) is not None:
        tokenizer = _with_family_tokens(_load(prepared), family, prepared, strict=True)
    else:
        tokenizer = train_tokenizer(cfg, family=family)
    _save_atomically(tokenizer, out_dir)
    return tokenizer


def train_tokenizer(cfg: DataConfig, *, family: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a bounded, deterministic sample of the training source(s)."""
    specials = family_special_tokens(family)
    if cfg.vocab_size < 256 + len(specials) + 1:
        raise DataError(
            f"data.vocab_size: {cfg.vocab_size} is too small for 256 bytes + {len(specials)} "
            f"special tokens of family {family!r}"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=specials,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_sample(cfg), trainer=trainer)
    _set_post_processor(bpe, family)
    extra = {"additional_special_tokens": SENTINELS} if family == "t5" else {}
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **FAMILY_TOKENS[family], **extra)


def _training_sample(cfg: DataConfig) -> Iterator[str]:
    """tokenizer_train_chars of text, shared among a mixture's sources by weight."""
    components = cfg.components
    total = sum(c.weight for c in components)
    for c in components:
        spec = resolve_source(c.source, cfg, "train", held_out=cfg.validation_source is None)
        yield from spec.sample_texts(max(int(cfg.tokenizer_train_chars * c.weight / total), 1))


class Encoder:
    """text -> token-id array through the Rust tokenizer directly; picklable.

    Special-token strings inside a document ("</s>" in HTML, "[MASK]" in a README) are encoded as plain
    text: only the pipeline itself inserts separators, masks and sentinels.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.encode_special_tokens = True

    def __call__(self, text: str) -> np.ndarray:
        return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """Identifies a tokenizer's vocabulary (prepared shards record it, so a mismatch is caught)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]


def _set_post_processor(bpe: Tokenizer, family: str) -> None:
    """What `tokenizer(text)` adds for HF users (the pipeline adds special tokens itself)."""
    if family == "bert":
        cls, sep = bpe.token_to_id("[CLS]"), bpe.token_to_id("[SEP]")
        bpe.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
    elif family == "t5":
        bpe.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", bpe.token_to_id("</s>"))]
        )


def load_tokenizer(name: str, *, offline: bool = False) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a directory or a hub name (`offline`: the local cache only); DataError in one line."""
    return _load(name, offline=offline)


def _load(name: str, *, offline: bool = False) -> PreTrainedTokenizerFast:
    if _is_local_path(name) and not os.path.isdir(os.path.expanduser(name)):
        raise DataError(f"data.tokenizer: no such directory: {name}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
    except Exception as exc:  # hub/file errors come in many types; one clear line is what helps
        if offline and not _is_local_path(name):
            raise DataError(
                f"data.tokenizer: {name!r} is not usable offline: not a local directory and not in the local "
                "Hugging Face cache"
            ) from None
        raise DataError(
            f"data.tokenizer: cannot load {name!r}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise DataError(f"data.tokenizer: {name!r} is not a fast (Rust) tokenizer")
    return tokenizer


def _is_local_path(name: str) -> bool:
    """A filesystem path rather than a hub name (`org/name`): absolute, relative with ./ or ~, or existing."""
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


def with_family_tokens(tokenizer: PreTrainedTokenizerFast, family: str, name: str) -> PreTrainedTokenizerFast:
    """`tokenizer` as a run of `family` will use it (missing special tokens added; GPT pads with EOS)."""
    return _with_family_tokens(tokenizer, family, name, strict=False)


def _with_family_tokens(
    tokenizer: PreTrainedTokenizerFast, family: str, name: str, *, strict: bool
) -> PreTrainedTokenizerFast:
    """Adds the family's missing special tokens (strict: they must already be there)."""
    missing = {k: v for k, v in FAMILY_TOKENS[family].items() if getattr(tokenizer, k, None) is None}
    if family == "gpt" and tokenizer.eos_token is not None:
        # GPT-2 style: no pad (or bos) token of its own; reuse EOS as transformers does, never grow the vocabulary
        for key in ("pad_token", "bos_token"):
            if missing.pop(key, None) is not None:
                setattr(tokenizer, key, tokenizer.eos_token)
    sentinels = [s for s in SENTINELS if s not in tokenizer.get_vocab()] if family == "t5" else []
    if strict and (missing or sentinels):
        raise DataError(
            f"tokenizer {name!r} lacks the {family} special tokens "
            f"{', '.join(list(missing.values()) + sentinels[:3])}{' ...' if len(sentinels) > 3 else ''}"
        )
    if missing:
        tokenizer.add_special_tokens(missing)
    if sentinels:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": sentinels}, replace_extra_special_tokens=False
        )
    return tokenizer


def _prepared_tokenizer_dir(cfg: DataConfig) -> str | None:
    """The tokenizer saved with prepared shards, when the (first) source is a prepared directory."""
    source = os.path.expanduser(cfg.components[0].source)
    return os.path.join(source, "tokenizer") if os.path.exists(os.path.join(source, PREPARED_INDEX)) else None


def _save_atomically(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Several ranks may build it at once: write to a temporary dir, then rename (first one wins)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out_dir)  # atomic; also replaces an empty directory
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another rank's identical copy is already there
    if not (out_dir / "tokenizer.json").exists():
        raise DataError(f"cannot save the tokenizer into {out_dir}: it is a non-empty directory without one")
