"""Typed model configs, one per family on a shared base, and the named presets.

Each field is an architecture or training-time knob of the model itself; the run config in `pretrain/`
selects a preset and overrides fields by name. Construction validates everything, so a typo or an
impossible shape fails at start-up with a one-line message naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

# Exact: auto, eager, sdpa, chunked. Approximate (self attention only; see models/attention.py): sparse,
# linformer, lsh.
AttentionBackend = Literal["auto", "eager", "sdpa", "chunked", "sparse", "linformer", "lsh"]
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


@dataclass(kw_only=True)
class ModelConfig:
    """Fields every family shares. `family` is fixed by the subclass."""

    family: str = field(default="", init=False)
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int | None
    activation: str
    layer_norm_eps: float
    attention: AttentionBackend = "auto"
    attention_window: int | None = None  # sliding-window (local) self attention; None = global
    attention_block: int | None = None  # chunked/sparse query/key tile (and random block); None = 256
    # sparse: the first k positions attend to, and are attended by, every position (BigBird's global tokens)
    attention_global: int = 0
    # sparse: random key blocks (of attention_block keys) per query block, on top of window + global
    attention_random: int = 0
    # seed of the fixed random parts of approximate attention: sparse's random blocks, lsh's rotations
    attention_seed: int = 0
    linformer_k: int = 256  # linformer: keys and values projected along the sequence to this many rows
    linformer_share_kv: bool = False  # linformer: one projection for keys and values (else one each)
    lsh_n_hashes: int = 4  # lsh: rounds of hashing (more rounds, fewer missed neighbours, more time)
    lsh_bucket_size: int = 64  # lsh: sorted chunk length; buckets ~ 2 L / this, as in Reformer
    reversible: bool = False  # reversible residual layers: activation memory independent of depth
    gradient_checkpointing: bool = False
    dropout: float = 0.0
    attention_dropout: float = 0.0
    pad_token_id: int = 0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
            if getattr(self, name) < 1:
                raise ValueError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"model config: attention={self.attention!r}; accepted: {', '.join(ATTENTION_BACKENDS)}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"model config: activation={self.activation!r}; accepted: {', '.join(ACTIVATIONS)}"
            )
        for name in ("attention_window", "attention_block"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"model config: {name} must be >= 1 or None, got {getattr(self, name)}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model config: {name} must be in [0, 1), got {getattr(self, name)}")
        self._check_approximate_attention()

    def _check_approximate_attention(self) -> None:
        """The approximate backends' fields, and the families each one does not fit, named in one line."""
        for name in ("attention_global", "attention_random"):
            if getattr(self, name) < 0:
                raise ValueError(f"model config: {name} must be >= 0, got {getattr(self, name)}")
            if getattr(self, name) and self.attention != "sparse":
                raise ValueError(f"model config: {name} applies to attention='sparse' only")
        for name in ("linformer_k", "lsh_n_hashes", "lsh_bucket_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.attention == "sparse" and self.attention_window is None:
            raise ValueError("model config: attention='sparse' needs attention_window (the local band)")
        if self.attention in ("linformer", "lsh") and self.attention_window is not None:
            raise ValueError(f"model config: attention_window does not apply to attention={self.attention!r}")
        if self.attention in ("sparse", "lsh") and self.attention_dropout > 0:
            raise ValueError(
                f"model config: attention={self.attention!r} has no attention dropout; set attention_dropout=0"
            )
        if self.attention == "linformer":
            if self.family == "gpt":
                raise ValueError(
                    "model config: attention='linformer' is not causal (its projections mix all positions); "
                    "GPT needs causal attention: use sparse or lsh"
                )
            if self.family == "t5":
                raise ValueError(
                    "model config: attention='linformer' cannot apply T5's relative position bias (projected "
                    "keys have no position); use sparse"
                )
            if self.max_seq_len is None:
                raise ValueError(
                    "model config: attention='linformer' needs max_seq_len (the projections' width)"
                )
        if self.attention == "lsh" and self.family == "t5":
            raise ValueError(
                "model config: attention='lsh' (Reformer's shared query-key projection) does not fit T5's "
                "separate query and key projections and relative bias; use sparse"
            )
        if self.reversible and self.family == "bert":
            raise ValueError("model config: reversible needs pre-norm blocks; BERT's are post-norm")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(kw_only=True)
class _AbsolutePositionConfig(ModelConfig):
    """GPT-2 and BERT: absolute positions (learned, as published, or sinusoidal); d_model = heads x width."""

    max_seq_len: int
    positions: Literal["learned", "sinusoidal"] = "learned"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model config: d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.positions not in ("learned", "sinusoidal"):
            raise ValueError(f"model config: positions={self.positions!r}; accepted: learned, sinusoidal")
        if self.max_seq_len < 1:
            raise ValueError(f"model config: max_seq_len must be >= 1, got {self.max_seq_len}")


@dataclass(kw_only=True)
class GPTConfig(_AbsolutePositionConfig):
    """GPT-2 layout: pre-norm, learned positions, tanh-GELU, LM head tied to the token embedding."""

    family: str = field(default="gpt", init=False)
    max_seq_len: int = 1024
    activation: str = "gelu_tanh"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 0
    eos_token_id: int = 0


@dataclass(kw_only=True)
class BERTConfig(_AbsolutePositionConfig):
    """BERT layout: post-norm, token types, exact GELU, MLM head tied to the word embedding."""

    family: str = field(default="bert", init=False)
    max_seq_len: int = 512
    activation: str = "gelu"
    layer_norm_eps: float = 1e-12
    type_vocab_size: int = 2


@dataclass(kw_only=True)
class T5Config(ModelConfig):
    """T5 encoder-decoder. v1.0: ReLU, tied head with d_model**-0.5 logit scaling; v1.1: gated tanh-GELU, untied.

    `d_kv * n_heads` may differ from `d_model`. Attention is unscaled (the init absorbs 1/sqrt(d_kv)).
    """

    family: str = field(default="t5", init=False)
    max_seq_len: int | None = None
    activation: str = "relu"
    gated: bool = False
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-6
    d_kv: int = 64
    n_decoder_layers: int | None = None
    relative_buckets: int = 32
    relative_max_distance: int = 128
    init_std: float = 1.0
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        if self.d_kv < 1 or self.n_decoder_layers < 1:
            raise ValueError(
                f"model config: d_kv and n_decoder_layers must be >= 1, got {self.d_kv}, {self.n_decoder_layers}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_kv


CONFIG_CLASSES: dict[str, type[ModelConfig]] = {"gpt": GPTConfig, "bert": BERTConfig, "t5": T5Config}


def _gpt2(d_model: int, n_layers: int, n_heads: int) -> tuple[type[ModelConfig], dict[str, Any]]:
    return GPTConfig, dict(
        vocab_size=50257, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=4 * d_model,
        bos_token_id=50256, eos_token_id=50256, pad_token_id=50256, dropout=0.1, attention_dropout=0.1,
    )  # fmt: skip


def _bert(d_model: int, n_layers: int, n_heads: int) -> tuple[type[ModelConfig], dict[str, Any]]:
    return BERTConfig, dict(
        vocab_size=30522, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=4 * d_model,
        dropout=0.1, attention_dropout=0.1,
    )  # fmt: skip


def _t5(
    d_model: int, n_layers: int, n_heads: int, d_ff: int, d_kv: int = 64
) -> tuple[type[ModelConfig], dict[str, Any]]:
    return T5Config, dict(
        vocab_size=32128, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff, d_kv=d_kv,
        dropout=0.1, attention_dropout=0.1,
    )  # fmt: skip


def _t5_v1_1(
    d_model: int, n_layers: int, n_heads: int, d_ff: int
) -> tuple[type[ModelConfig], dict[str, Any]]:
    # v1.1 pre-trained without dropout (a quality win noted in its release) and with an untied head.
    return T5Config, dict(
        vocab_size=32128, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff, d_kv=64,
        activation="gelu_tanh", gated=True, tie_embeddings=False,
    )  # fmt: skip


# Tiny presets: a few layers at width 128-256 so that a demo trains in minutes on 2 CPU cores.
# The vocabulary matches the tokenizer the data layer trains by default; pretrain overrides it anyway.
PRESETS: dict[str, tuple[type[ModelConfig], dict[str, Any]]] = {
    "gpt-tiny": (
        GPTConfig,
        dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_seq_len=512),
    ),
    "gpt2-small": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    "bert-tiny": (
        BERTConfig,
        dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_seq_len=512),
    ),
    "bert-base": _bert(768, 12, 12),
    "bert-large": _bert(1024, 24, 16),
    "t5-tiny": (T5Config, dict(vocab_size=8192, d_model=256, n_layers=3, n_heads=4, d_ff=1024, d_kv=64)),
    "t5-small": _t5(512, 6, 8, 2048),
    "t5-base": _t5(768, 12, 12, 3072),
    "t5-large": _t5(1024, 24, 16, 4096),
    "t5-v1_1-small": _t5_v1_1(512, 8, 6, 1024),
    "t5-v1_1-base": _t5_v1_1(768, 12, 12, 2048),
    "t5-v1_1-large": _t5_v1_1(1024, 24, 16, 2816),
}


def get_config(preset: str, **overrides: Any) -> ModelConfig:
    """The preset's config with `overrides` applied; unknown presets or fields raise a ValueError naming them."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; accepted: {', '.join(PRESETS)}")
    cls, values = PRESETS[preset]
    return make_config(cls, {**values, **overrides}, source=f"preset {preset!r}")


def make_config(
    cls: type[ModelConfig], values: dict[str, Any], *, source: str = "model config"
) -> ModelConfig:
    """Build `cls` from `values`, naming any unknown field and listing the accepted ones."""
    accepted = [f.name for f in dataclasses.fields(cls) if f.init]
    values = dict(values)
    family = values.pop("family", None)
    if family not in (None, cls.family):
        raise ValueError(f"{source}: family={family!r} does not match {cls.__name__} ({cls.family!r})")
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    return cls(**values)
