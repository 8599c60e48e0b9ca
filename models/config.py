"""Typed model configs, one per family on a shared base, and the named presets.

Each field is an architecture or training-time knob of the model itself; the run config in `pretrain/`
selects a preset and overrides fields by name. Construction validates everything, so a typo or an
impossible shape fails at start-up with a one-line message naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

# Exact: auto, eager, sdpa, chunked. Approximate (self attention only; see models/attention.py): sparse,
# linformer, lsh.
AttentionBackend = Literal["auto", "eager", "sdpa", "chunked", "sparse", "linformer", "lsh"]
ATTENTION_BACKENDS: tuple[str, ...] = typing.get_args(AttentionBackend)
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


def _doc(text: str, default: Any = dataclasses.MISSING) -> Any:
    """A field documented where it is declared (`pretrain config` prints the text)."""
    return field(default=default, metadata={"doc": text})


@dataclass(kw_only=True)
class ModelConfig:
    """Fields every family shares. `family` is fixed by the subclass."""

    __pydantic_config__ = {"extra": "forbid"}  # validated by pydantic from a run config: no unknown fields

    family: str = field(default="", init=False)
    vocab_size: int = _doc(
        "tokens the model knows: embedding rows before any vocab_multiple padding (a run fills it from its "
        "tokenizer unless set)"
    )
    d_model: int = _doc("hidden width")
    n_layers: int = _doc("transformer blocks (T5: encoder blocks)")
    n_heads: int = _doc("attention heads")
    d_ff: int = _doc("feed-forward inner width")
    max_seq_len: int | None = _doc("positions the model can take (learned/sinusoidal tables)")
    activation: str = _doc(f"feed-forward activation: {', '.join(ACTIVATIONS)}")
    layer_norm_eps: float = _doc("epsilon of the layer (or RMS) norms")
    attention: AttentionBackend = _doc(
        "attention backend: eager (reference), sdpa (PyTorch), chunked (ours, O(n) memory), auto (the fastest "
        "exact one for each call); approximate, self attention only: sparse (window + global + random blocks), "
        "linformer (bidirectional), lsh (Reformer, near-linear)",
        "auto",
    )
    attention_window: int | None = _doc("sliding-window (local) self attention width; null = global", None)
    attention_block: int | None = _doc(
        "chunked and sparse kernels' query/key tile (and sparse's random block); null = 256", None
    )
    attention_global: int = _doc(
        "sparse: the first k positions attend to, and are attended by, every position (global tokens)", 0
    )
    attention_random: int = _doc(
        "sparse: random key blocks (of attention_block keys) per query block, on top of window + global", 0
    )
    attention_seed: int = _doc(
        "seed of approximate attention's fixed random parts (sparse blocks, lsh rotations)", 0
    )
    linformer_k: int = _doc("linformer: keys and values projected along the sequence to this many rows", 256)
    linformer_share_kv: bool = _doc("linformer: one projection for keys and values (else one each)", False)
    lsh_n_hashes: int = _doc("lsh: rounds of hashing (more rounds, fewer missed neighbours, more time)", 4)
    lsh_bucket_size: int = _doc("lsh: sorted chunk length; buckets ~ 2 L / this, as in Reformer", 64)
    reversible: bool = _doc("reversible residual layers: activation memory independent of depth", False)
    gradient_checkpointing: bool = _doc(
        "recompute each block in backward instead of storing activations", False
    )
    dropout: float = _doc("dropout on embeddings and residual branches", 0.0)
    attention_dropout: float = _doc("dropout on attention probabilities (not with the chunked kernel)", 0.0)
    pad_token_id: int = _doc("padding token (a run fills it from its tokenizer)", 0)
    init_std: float = _doc("standard deviation of the normal weight initialisation", 0.02)
    positive_fields: ClassVar[tuple[str, ...]] = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff")

    def __post_init__(self) -> None:
        for name in self.positive_fields:
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

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the token table and the head's outputs (text families may pad them: `vocab_multiple`)."""
        return self.vocab_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(kw_only=True)
class _TextConfig(ModelConfig):
    """Token in, tokens out: a vocabulary, whose table may be padded for the hardware and the shards."""

    vocab_multiple: int = _doc(
        "token table (and head) rows rounded up to a multiple of this, as Megatron's "
        "make-vocab-size-divisible-by: shards that split evenly, aligned matmuls; the extra rows are never "
        "looked up, their logits are masked out of softmax and loss, and logits come back at vocab_size",
        1,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab_multiple < 1:
            raise ValueError(f"model config: vocab_multiple must be >= 1, got {self.vocab_multiple}")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the token table (and of an untied head): vocab_size rounded up to vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


@dataclass(kw_only=True)
class _AbsolutePositionConfig(_TextConfig):
    """GPT-2 and BERT: absolute positions (learned, as published, or sinusoidal); d_model = heads x width."""

    max_seq_len: int = _doc("positions the model can take (size of the position table)")
    positions: Literal["learned", "sinusoidal"] = _doc(
        "absolute positions: learned (as published) or sinusoidal", "learned"
    )

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
    max_seq_len: int = _doc("positions the model can take (size of the position table)", 1024)
    activation: str = _doc(f"feed-forward activation: {', '.join(ACTIVATIONS)}", "gelu_tanh")
    layer_norm_eps: float = _doc("epsilon of the layer norms", 1e-5)
    bos_token_id: int = _doc("beginning-of-sequence token (a run fills it from its tokenizer)", 0)
    eos_token_id: int = _doc("end-of-sequence token (a run fills it from its tokenizer)", 0)


@dataclass(kw_only=True)
class BERTConfig(_AbsolutePositionConfig):
    """BERT layout: post-norm, token types, exact GELU, MLM head tied to the word embedding."""

    family: str = field(default="bert", init=False)
    max_seq_len: int = _doc("positions the model can take (size of the position table)", 512)
    activation: str = _doc(f"feed-forward activation: {', '.join(ACTIVATIONS)}", "gelu")
    layer_norm_eps: float = _doc("epsilon of the layer norms", 1e-12)
    type_vocab_size: int = _doc("token types (segments A/B)", 2)


@dataclass(kw_only=True)
class T5Config(_TextConfig):
    """T5 encoder-decoder. v1.0: ReLU, tied head with d_model**-0.5 logit scaling; v1.1: gated tanh-GELU, untied.

    `d_kv * n_heads` may differ from `d_model`. Attention is unscaled (the init absorbs 1/sqrt(d_kv)).
    """

    family: str = field(default="t5", init=False)
    max_seq_len: int | None = _doc(
        "T5 has relative positions: no limit (null), or a cap the data must respect", None
    )
    activation: str = _doc(f"feed-forward activation: {', '.join(ACTIVATIONS)}", "relu")
    gated: bool = _doc("gated feed-forward (v1.1: gated-GELU)", False)
    tie_embeddings: bool = _doc("LM head shares the token embedding (v1.0), scaled by d_model**-0.5", True)
    layer_norm_eps: float = _doc("epsilon of the RMS norms", 1e-6)
    d_kv: int = _doc("width of each attention head (d_kv x n_heads may differ from d_model)", 64)
    n_decoder_layers: int | None = _doc("decoder blocks; null = n_layers", None)
    relative_buckets: int = _doc("relative-position buckets of the attention bias", 32)
    relative_max_distance: int = _doc("distance beyond which relative positions share the last bucket", 128)
    init_std: float = _doc("initialisation scale (T5's factor; 1.0 as published)", 1.0)
    pad_token_id: int = _doc("padding token (a run fills it from its tokenizer)", 0)
    eos_token_id: int = _doc("end-of-sequence token (a run fills it from its tokenizer)", 1)
    decoder_start_token_id: int = _doc("first decoder input (a run uses its tokenizer's pad token)", 0)

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


# --- images and speech: same blocks, other inputs -----------------------------------------------------


@dataclass(kw_only=True)
class _ImageConfig(ModelConfig):
    """Pixels in, pixels out: no vocabulary, and the sequence is the patch grid (`max_seq_len` is derived)."""

    positive_fields: ClassVar[tuple[str, ...]] = (
        "d_model", "n_layers", "n_heads", "d_ff", "image_size", "patch_size", "num_channels",
    )  # fmt: skip
    vocab_size: int = field(default=0, init=False)
    max_seq_len: int | None = field(default=None, init=False)
    image_size: int = _doc("side of the square input images, in pixels (the data layer crops to it)", 224)
    patch_size: int = _doc("side of the square patches, in pixels (one token each)", 16)
    num_channels: int = _doc("image channels: 3 (RGB) or 1 (gray)", 3)
    activation: str = _doc(f"feed-forward activation: {', '.join(ACTIVATIONS)}", "gelu")
    layer_norm_eps: float = _doc("epsilon of the layer norms", 1e-6)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model config: image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )

    @property
    def grid_size(self) -> int:
        """Patches per side (square images)."""
        return self.image_size // self.patch_size


@dataclass(kw_only=True)
class _ViTConfig(_ImageConfig):
    """ViT: patch embedding, [CLS], absolute positions, pre-norm encoder (the GPT-2 block, not causal)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_heads("d_model", self.d_model, "n_heads", self.n_heads)
        self.max_seq_len = self.grid_size**2 + 1


def _check_heads(width_name: str, width: int, heads_name: str, heads: int) -> None:
    if heads < 1 or width % heads:
        raise ValueError(f"model config: {width_name}={width} is not divisible by {heads_name}={heads}")


@dataclass(kw_only=True)
class ViTMAEConfig(_ViTConfig):
    """MAE: the encoder sees only the kept (1 - mask_ratio) patches; a light decoder predicts the pixels of
    the masked ones (normalised per patch with `norm_pix_loss`). Positions are fixed 2-D sin-cos tables."""

    family: str = field(default="vit_mae", init=False)
    positive_fields: ClassVar[tuple[str, ...]] = _ImageConfig.positive_fields + (
        "decoder_d_model", "decoder_n_layers", "decoder_n_heads", "decoder_d_ff",
    )  # fmt: skip
    decoder_d_model: int = _doc("width of the pixel decoder (divisible by 4: 2-D sin-cos positions)", 512)
    decoder_n_layers: int = _doc("blocks of the pixel decoder", 8)
    decoder_n_heads: int = _doc("attention heads of the pixel decoder", 16)
    decoder_d_ff: int = _doc("feed-forward inner width of the pixel decoder", 2048)
    mask_ratio: float = _doc("share of the patches hidden from the encoder (at least one is kept)", 0.75)
    norm_pix_loss: bool = _doc("targets are each patch's pixels normalised by its own mean and std", True)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_heads("decoder_d_model", self.decoder_d_model, "decoder_n_heads", self.decoder_n_heads)
        for name in ("d_model", "decoder_d_model"):
            if getattr(self, name) % 4:
                raise ValueError(f"model config: {name} must be divisible by 4 (2-D sin-cos positions)")
        if not 0.0 <= self.mask_ratio < 1.0 or self.num_kept < 1:
            raise ValueError(f"model config: mask_ratio={self.mask_ratio} must leave at least one patch")

    @property
    def num_kept(self) -> int:
        """Patches the encoder sees (transformers' `len_keep`)."""
        return int(self.grid_size**2 * (1 - self.mask_ratio))


@dataclass(kw_only=True)
class ViTSimMIMConfig(_ViTConfig):
    """SimMIM on ViT: learned positions, masked patches replaced by a learned [MASK] embedding, and a 1x1
    convolution + pixel shuffle that reconstructs every patch (L1 loss on the masked ones)."""

    family: str = field(default="vit_simmim", init=False)


@dataclass(kw_only=True)
class SwinConfig(_ImageConfig):
    """Swin with a SimMIM head. Stage s has `depths[s]` blocks of width d_model * 2**s with
    `stage_heads[s]` heads; windows of window_size**2 patches alternate with windows shifted by half a
    window; patch merging halves the resolution between stages. `n_layers`, `n_heads`, `d_ff` are derived
    (all blocks, the first stage's heads and feed-forward width)."""

    family: str = field(default="swin", init=False)
    n_layers: int = field(default=0, init=False)
    n_heads: int = field(default=0, init=False)
    d_ff: int = field(default=0, init=False)
    patch_size: int = _doc("side of the square patches, in pixels (one token each at the first stage)", 4)
    layer_norm_eps: float = _doc("epsilon of the layer norms", 1e-5)
    depths: tuple[int, ...] = _doc("blocks per stage (stage s is d_model * 2**s wide)", (2, 2, 6, 2))
    stage_heads: tuple[int, ...] = _doc("attention heads per stage (one entry per stage)", (3, 6, 12, 24))
    window_size: int = _doc("side of the attention windows, in patches (no stage may be smaller)", 7)
    mlp_ratio: float = _doc("feed-forward inner width / block width (d_ff = mlp_ratio * d_model)", 4.0)
    absolute_positions: bool = _doc("also add learned absolute positions to the patch embeddings", False)
    drop_path: float = _doc("stochastic depth of the last block, linearly from 0 at the first", 0.0)

    def __post_init__(self) -> None:
        self.depths, self.stage_heads = tuple(self.depths), tuple(self.stage_heads)
        if not self.depths or len(self.depths) != len(self.stage_heads) or min(self.depths) < 1:
            raise ValueError(
                f"model config: depths={self.depths} and stage_heads={self.stage_heads} need one entry >= 1 per stage"
            )
        self.n_layers, self.n_heads = sum(self.depths), self.stage_heads[0]
        self.d_ff = int(self.mlp_ratio * self.d_model)
        super().__post_init__()
        for s, heads in enumerate(self.stage_heads):
            _check_heads(f"stage {s} width", self.d_model * 2**s, f"stage_heads[{s}]", heads)
        side = self.grid_size
        for s in range(len(self.depths)):
            if side < self.window_size:
                raise ValueError(
                    f"model config: stage {s} is {side}x{side} patches, smaller than window_size={self.window_size}"
                )
            side = (side + 1) // 2
        if self.image_size % self.stride:
            raise ValueError(
                f"model config: image_size={self.image_size} is not divisible by the last stage's stride {self.stride}"
            )
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"model config: drop_path must be in [0, 1), got {self.drop_path}")
        self.max_seq_len = self.grid_size**2

    @property
    def stride(self) -> int:
        """Pixels per token side at the last stage (transformers' `encoder_stride`)."""
        return self.patch_size * 2 ** (len(self.depths) - 1)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(kw_only=True)
class ConformerConfig(ModelConfig):
    """Conformer over raw audio, BEST-RQ objective.

    wav2vec 2.0's convolutional feature encoder subsamples the waveform (`conv_*`: 20 ms frames, 25 ms
    receptive field at 16 kHz by default); each block is macaron feed-forward (half-step) -> relative-position
    self attention -> convolution module (GLU, depthwise conv, BatchNorm) -> feed-forward (half-step) ->
    LayerNorm. The head predicts, for every masked frame, the codebook index (`vocab_size` entries per
    codebook, `num_codebooks` codebooks) that a frozen random-projection quantizer assigns to that frame's
    log-mel features (`n_mels`, `codebook_dim`, `quantizer_seed`; computed by the data layer, which also masks
    spans of `mask_time_length` frames starting at a `mask_time_prob` share of frames).
    """

    family: str = field(default="conformer", init=False)
    positive_fields: ClassVar[tuple[str, ...]] = ModelConfig.positive_fields + (
        "num_codebooks", "codebook_dim", "n_mels", "sample_rate", "depthwise_kernel", "mask_time_length",
    )  # fmt: skip
    vocab_size: int = _doc("entries per codebook of the BEST-RQ quantizer (the head's classes)", 8192)
    max_seq_len: int | None = _doc("frames the model can take; null = any (relative positions)", None)
    activation: str = _doc(f"feed-forward activation: {', '.join(ACTIVATIONS)}", "silu")
    layer_norm_eps: float = _doc("epsilon of the layer norms", 1e-5)
    conv_dim: tuple[int, ...] = _doc(
        "channels of each feature-encoder convolution (wav2vec 2.0's)", (512, 512, 512, 512, 512, 512, 512)
    )
    conv_kernel: tuple[int, ...] = _doc("kernel of each feature-encoder convolution", (10, 3, 3, 3, 3, 2, 2))
    conv_stride: tuple[int, ...] = _doc(
        "stride of each feature-encoder convolution (their product: samples per frame)", (5, 2, 2, 2, 2, 2, 2)
    )
    conv_bias: bool = _doc("feature-encoder convolutions have a bias", False)
    feature_norm: Literal["group", "layer"] = _doc(
        "feature-encoder norm: group (first convolution only) or layer (after every one)", "group"
    )
    feature_activation: str = _doc(f"feature-encoder activation: {', '.join(ACTIVATIONS)}", "gelu")
    depthwise_kernel: int = _doc("kernel of the convolution module's depthwise convolution (odd)", 31)
    mask_time_prob: float = _doc(
        "share of the frames masked, in spans of mask_time_length (wav2vec 2.0's rule; the data layer masks)",
        0.05,
    )
    mask_time_length: int = _doc("frames per masked span", 10)
    num_codebooks: int = _doc("codebooks of the quantizer: labels per masked frame", 1)
    codebook_dim: int = _doc("dimension the quantizer projects log-mel features to", 16)
    n_mels: int = _doc("log-mel features per frame that the quantizer reads", 80)
    quantizer_seed: int = _doc("seed of the frozen random projection and codebooks", 0)
    quantizer_norm: Literal["bin", "utterance"] = _doc(
        "how the quantizer standardises an utterance's log-mel features before projecting them: per mel bin "
        "(each bin's mean and std over time), or utterance (one mean and std over all bins, keeping their "
        "relative levels; for tonal audio, where per-bin scaling turns noise-only bins into unit-variance noise)",
        "bin",
    )
    sample_rate: int = _doc("audio samples per second (the data layer resamples to it)", 16000)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_heads("d_model", self.d_model, "n_heads", self.n_heads)
        self.conv_dim, self.conv_kernel = tuple(self.conv_dim), tuple(self.conv_kernel)
        self.conv_stride = tuple(self.conv_stride)
        if not self.conv_dim or not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            raise ValueError("model config: conv_dim, conv_kernel and conv_stride need one entry per layer")
        if min(self.conv_dim + self.conv_kernel + self.conv_stride) < 1:
            raise ValueError("model config: conv_dim, conv_kernel and conv_stride entries must be >= 1")
        if self.feature_norm not in ("group", "layer"):
            raise ValueError(f"model config: feature_norm={self.feature_norm!r}; accepted: group, layer")
        if self.feature_activation not in ACTIVATIONS:
            raise ValueError(
                f"model config: feature_activation={self.feature_activation!r}; accepted: {', '.join(ACTIVATIONS)}"
            )
        if self.quantizer_norm not in ("bin", "utterance"):
            raise ValueError(
                f"model config: quantizer_norm={self.quantizer_norm!r}; accepted: bin, utterance"
            )
        if self.depthwise_kernel % 2 == 0:
            raise ValueError(
                f"model config: depthwise_kernel={self.depthwise_kernel} must be odd ('same' padding)"
            )
        if not 0.0 <= self.mask_time_prob < 1.0:
            raise ValueError(f"model config: mask_time_prob must be in [0, 1), got {self.mask_time_prob}")

    @property
    def frame_stride(self) -> int:
        """Samples between consecutive frames (the product of the conv strides)."""
        return math.prod(self.conv_stride)

    @property
    def receptive_field(self) -> int:
        """Samples one frame sees: frame t covers samples [t * frame_stride, t * frame_stride + this)."""
        field_, jump = 1, 1
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            field_, jump = field_ + (kernel - 1) * jump, jump * stride
        return field_

    def num_frames(self, num_samples: int) -> int:
        """Frames the feature encoder makes of `num_samples` samples (0 when shorter than one frame)."""
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            num_samples = max((num_samples - kernel) // stride + 1, 0)
        return num_samples


CONFIG_CLASSES: dict[str, type[ModelConfig]] = {"gpt": GPTConfig, "bert": BERTConfig, "t5": T5Config}
CONFIG_CLASSES.update(
    vit_mae=ViTMAEConfig, vit_simmim=ViTSimMIMConfig, swin=SwinConfig, conformer=ConformerConfig
)


def _gpt2(d_model: int, n_layers: int, n_heads: int) -> tuple[type[ModelConfig], dict[str, Any]]:
    return GPTConfig, dict(
        vocab_size=50257, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=4 * d_model,
        bos_token_id=50256, eos_token_id=50256, pad_token_id=50256, dropout=0.1, attention_dropout=0.1,
        vocab_multiple=128,
    )  # fmt: skip


def _bert(d_model: int, n_layers: int, n_heads: int) -> tuple[type[ModelConfig], dict[str, Any]]:
    return BERTConfig, dict(
        vocab_size=30522, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=4 * d_model,
        dropout=0.1, attention_dropout=0.1, vocab_multiple=128,
    )  # fmt: skip


def _t5(
    d_model: int, n_layers: int, n_heads: int, d_ff: int, d_kv: int = 64
) -> tuple[type[ModelConfig], dict[str, Any]]:
    return T5Config, dict(
        vocab_size=32128, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff, d_kv=d_kv,
        dropout=0.1, attention_dropout=0.1, vocab_multiple=128,
    )  # fmt: skip


def _t5_v1_1(
    d_model: int, n_layers: int, n_heads: int, d_ff: int
) -> tuple[type[ModelConfig], dict[str, Any]]:
    # v1.1 pre-trained without dropout (a quality win noted in its release) and with an untied head.
    return T5Config, dict(
        vocab_size=32128, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff, d_kv=64,
        activation="gelu_tanh", gated=True, tie_embeddings=False, vocab_multiple=128,
    )  # fmt: skip


# The published sizes pad their vocabulary to a multiple of 128 rows (Megatron's default): even shards and
# aligned matmuls on any world size; T5's 32128 already is (its tokenizer has 32100 tokens).
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


def _vit_mae(
    d_model: int, n_layers: int, n_heads: int, patch_size: int = 16
) -> tuple[type[ModelConfig], dict[str, Any]]:
    # MAE's published encoders, all with the same 512-wide, 8-layer decoder.
    return ViTMAEConfig, dict(
        d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=4 * d_model, patch_size=patch_size
    )


# Tiny image presets: 32x32 images (the builtin image set's size), 64 patches of 4x4 pixels (Swin: 256 of
# 2x2, windows of 4x4); speech: 64-channel feature encoder, 4 blocks of width 96; all train on 2 CPU cores.
PRESETS.update({
    "vit-tiny-mae": (ViTMAEConfig, dict(
        image_size=32, patch_size=4, d_model=128, n_layers=4, n_heads=4, d_ff=512,
        decoder_d_model=96, decoder_n_layers=2, decoder_n_heads=4, decoder_d_ff=384,
    )),
    "vit-base-mae": _vit_mae(768, 12, 12),
    "vit-large-mae": _vit_mae(1024, 24, 16),
    "vit-huge-mae": _vit_mae(1280, 32, 16, patch_size=14),
    "vit-tiny-simmim": (ViTSimMIMConfig, dict(
        image_size=32, patch_size=4, d_model=128, n_layers=4, n_heads=4, d_ff=512,
    )),
    "vit-base-simmim": (ViTSimMIMConfig, dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072)),
    "swin-tiny-simmim": (SwinConfig, dict(
        image_size=32, patch_size=2, d_model=48, depths=(2, 2, 2), stage_heads=(3, 6, 12), window_size=4,
    )),
    # SimMIM's Swin-B: 192x192 images, windows of 6 patches.
    "swin-base-simmim": (SwinConfig, dict(
        image_size=192, d_model=128, depths=(2, 2, 18, 2), stage_heads=(4, 8, 16, 32), window_size=6,
    )),
    "conformer-tiny": (ConformerConfig, dict(
        vocab_size=512, d_model=96, n_layers=4, n_heads=4, d_ff=384, conv_dim=(64,) * 7,
        depthwise_kernel=15, mask_time_prob=0.065, quantizer_norm="utterance",  # the builtin set is tonal
    )),
    # wav2vec 2.0 base's size with Conformer blocks, and wav2vec2-conformer-rel-pos-large's geometry.
    "conformer-base": (ConformerConfig, dict(
        d_model=768, n_layers=12, n_heads=12, d_ff=3072, mask_time_prob=0.065, dropout=0.1,
    )),
    "conformer-large": (ConformerConfig, dict(
        d_model=1024, n_layers=24, n_heads=16, d_ff=4096, feature_norm="layer", conv_bias=True,
        mask_time_prob=0.065, dropout=0.1,
    )),
})  # fmt: skip


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
