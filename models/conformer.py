"""Conformer (Gulati et al. 2020) over raw audio, laid out as wav2vec2-conformer, with a BEST-RQ head.

waveform -> convolutional feature encoder (the subsampling: 20 ms frames at 16 kHz) -> LayerNorm +
projection -> masked frames replaced by a learned embedding -> blocks: half-step feed-forward, relative
position self attention, convolution module, half-step feed-forward, LayerNorm -> LayerNorm -> one linear
classifier per codebook. BEST-RQ (Chiu et al. 2022): the targets are the indices a frozen random-projection
quantizer gives each masked frame; the data layer computes them, so the model is a masked-frame classifier
with BERT's loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.attention import SelfAttention
from models.base import LanguageModel, SampleShape, cross_entropy, key_padding
from models.blocks import ACTIVATIONS, BlockConfig, FeedForward, Stack, make_norm
from models.config import ConformerConfig
from models.kernels.bias import PositionScores, relative_shift  # noqa: F401  (relative_shift: re-exported)
from models.outputs import ModelOutput

BLOCK_NORM_EPS = 1e-5  # every LayerNorm inside a block (fixed in wav2vec2-conformer, not the config's eps)


def relative_positions(length: int, d_model: int, device: torch.device | None = None) -> Tensor:
    """(2 L - 1, d_model) sinusoidal encodings of the relative positions L - 1, ..., 0, ..., -(L - 1)
    (Transformer-XL's order), computed term by term as wav2vec2-conformer does."""
    position = torch.arange(length, device=device).float().unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, device=device).float() * -(math.log(10000.0) / d_model))
    positive = torch.zeros(length, d_model, device=device)
    negative = torch.zeros(length, d_model, device=device)
    positive[:, 0::2], positive[:, 1::2] = torch.sin(position * div_term), torch.cos(position * div_term)
    negative[:, 0::2] = torch.sin(-1 * position * div_term)
    negative[:, 1::2] = torch.cos(-1 * position * div_term)
    return torch.cat([positive.flip(0), negative[1:]])


class RelPositionAttention(SelfAttention):
    """Transformer-XL's relative-position self attention (as in Conformer and wav2vec2-conformer).

    score(i, j) = [(q_i + u) . k_j + (q_i + v) . W p_(i - j)] / sqrt(d), with learned per-head u, v and
    sinusoidal p. The content term is the ordinary attention of (q + u) against k; the position term enters
    `attend` as `PositionScores` (q + v and the projected p): the chunked backend computes it per tile in
    O(L) memory, the others as a dense (B, H, L, L) bias.
    """

    def __init__(self, d_model: int, n_heads: int, **kwargs) -> None:
        super().__init__(d_model, n_heads, d_model // n_heads, **kwargs)
        self.pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(n_heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.empty(n_heads, self.head_dim))

    def forward(self, x: Tensor, *, positions: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        q, k, v = self._split(self.qkv(x), 3)  # (B, H, L, D) each
        p = self.pos(positions).view(-1, self.n_heads, self.head_dim).transpose(0, 1)  # (H, 2L - 1, D)
        scale = self.head_dim**-0.5 if self.scale is None else self.scale
        # u and v in q's dtype: under autocast q + u would be fp32 next to a bf16 k
        u, v_bias = (b[:, None].to(q.dtype) for b in (self.pos_bias_u, self.pos_bias_v))
        bias = PositionScores(query=q + v_bias, positions=p, scale=scale)
        return self._attend(q + u, k, v, key_padding_mask=key_padding_mask, bias=bias)


class RecomputeSafeBatchNorm(nn.BatchNorm1d):
    """BatchNorm whose running statistics move once per step under activation checkpointing too, and that
    normalises in its statistics' dtype (fp32) when mixed precision hands it low-precision inputs or weights.

    The recomputation in backward runs inside the autograd engine (a graph task is current); there it
    normalises with the batch's statistics as the first pass did, but leaves the running ones alone.
    """

    def forward(self, x: Tensor) -> Tensor:
        # nn.BatchNorm1d.forward's logic, but recomputation leaves the statistics alone and the arithmetic
        # runs in the statistics' dtype
        recompute = self.training and self.track_running_stats and torch._C._current_graph_task_id() != -1
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and not recompute:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        mean, var = (self.running_mean, self.running_var) if keep else (None, None)
        if recompute:
            mean, var = mean.clone(), var.clone()  # updated, then dropped
        dtype = x.dtype if self.running_mean is None else self.running_mean.dtype
        weight, bias = (None if t is None else t.to(dtype) for t in (self.weight, self.bias))
        out = F.batch_norm(x.to(dtype), mean, var, weight, bias, use_batch, momentum, self.eps)
        return out.to(x.dtype)


class ConvolutionModule(nn.Module):
    """LayerNorm -> pointwise conv to 2C -> GLU -> depthwise conv -> BatchNorm -> activation -> pointwise conv."""

    def __init__(self, d_model: int, kernel: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.activation = activation
        self.norm = nn.LayerNorm(d_model, eps=BLOCK_NORM_EPS)
        self.pointwise_in = nn.Conv1d(d_model, 2 * d_model, kernel_size=1, bias=False)
        self.depthwise = nn.Conv1d(
            d_model, d_model, kernel, padding=(kernel - 1) // 2, groups=d_model, bias=False
        )
        self.batch_norm = RecomputeSafeBatchNorm(d_model)
        self.pointwise_out = nn.Conv1d(d_model, d_model, kernel_size=1, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = F.glu(self.pointwise_in(self.norm(x).transpose(1, 2)), dim=1)  # (B, C, L)
        y = ACTIVATIONS[self.activation](self.batch_norm(self.depthwise(y)))
        return self.drop(self.pointwise_out(y)).transpose(1, 2)


class ConformerBlock(nn.Module):
    """Macaron block: x + FF/2, + relative-position attention, + convolution module, + FF/2, then LayerNorm."""

    def __init__(self, cfg: BlockConfig, *, kernel: int) -> None:
        super().__init__()
        self.ff1_norm, self.ff1 = make_norm(cfg), FeedForward(cfg)
        self.attn_norm = make_norm(cfg)
        self.attn = RelPositionAttention(
            cfg.d_model,
            cfg.n_heads,
            dropout=cfg.attention_dropout,
            backend=cfg.attention,
            block_size=cfg.attention_block,
        )
        self.conv = ConvolutionModule(cfg.d_model, kernel, cfg.activation, cfg.dropout)
        self.ff2_norm, self.ff2 = make_norm(cfg), FeedForward(cfg)
        self.out_norm = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, *, positions: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = x + 0.5 * self.drop(self.ff1(self.ff1_norm(x)))
        x = x + self.drop(
            self.attn(self.attn_norm(x), positions=positions, key_padding_mask=key_padding_mask)
        )
        x = x + self.conv(x)
        x = x + 0.5 * self.drop(self.ff2(self.ff2_norm(x)))
        return self.out_norm(x)


class ConvLayer(nn.Module):
    """One subsampling step: strided conv -> optional norm (GroupNorm per channel, or LayerNorm) -> activation."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int,
        *,
        bias: bool,
        norm: str | None,
        activation: str,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias)
        self.norm = {"group": nn.GroupNorm(c_out, c_out), "layer": nn.LayerNorm(c_out), None: None}[norm]

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)  # (B, C, T)
        if isinstance(self.norm, nn.LayerNorm):
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        elif self.norm is not None:
            x = self.norm(x)
        return ACTIVATIONS[self.activation](x)


class FeatureEncoder(nn.Module):
    """wav2vec 2.0's convolutional subsampling of the waveform: (B, S) samples -> (B, T, C) frames.
    `group` norm: GroupNorm on the first layer only; `layer`: LayerNorm after every layer."""

    def __init__(self, config: ConformerConfig) -> None:
        super().__init__()
        channels = (1, *config.conv_dim)
        self.layers = nn.ModuleList(
            ConvLayer(
                channels[i],
                channels[i + 1],
                kernel,
                stride,
                bias=config.conv_bias,
                norm="layer" if config.feature_norm == "layer" else ("group" if i == 0 else None),
                activation=config.feature_activation,
            )
            for i, (kernel, stride) in enumerate(zip(config.conv_kernel, config.conv_stride))
        )

    def forward(self, input_values: Tensor) -> Tensor:
        x = input_values[:, None]
        for layer in self.layers:
            x = layer(x)
        return x.transpose(1, 2)


class FeatureProjection(nn.Module):
    """LayerNorm over the conv channels, then a projection to the model width."""

    def __init__(self, config: ConformerConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.conv_dim[-1], eps=config.layer_norm_eps)
        self.linear = nn.Linear(config.conv_dim[-1], config.d_model)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.linear(self.norm(x)))


class Conformer(LanguageModel):
    def __init__(self, config: ConformerConfig) -> None:
        super().__init__()
        self.config = config
        block = BlockConfig.from_model(config, norm_eps=BLOCK_NORM_EPS, ff_dropout=config.dropout)
        self.subsample = FeatureEncoder(config)
        self.project = FeatureProjection(config)
        self.mask_embedding = nn.Parameter(torch.empty(config.d_model)) if config.mask_time_prob > 0 else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = Stack(
            [ConformerBlock(block, kernel=config.depthwise_kernel) for _ in range(config.n_layers)],
            gradient_checkpointing=config.gradient_checkpointing,
        )
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.d_model, config.num_codebooks * config.vocab_size)

    def frame_mask(self, attention_mask: Tensor, num_frames: int) -> Tensor:
        """(B, T) bool, True for frames made only of real samples, from a right-padded (B, S) sample mask."""
        lengths = attention_mask.sum(-1)
        for kernel, stride in zip(self.config.conv_kernel, self.config.conv_stride):
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return torch.arange(num_frames, device=attention_mask.device) < lengths[:, None]

    def encode(
        self,
        input_values: Tensor,
        attention_mask: Tensor | None = None,
        mask_time_indices: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(B, T, D) normalised encoder output (transformers' `last_hidden_state`) and the (B, T) frame mask
        (None without `attention_mask`). mask_time_indices: (B, T) bool, frames replaced by the mask embedding."""
        if input_values.dim() != 2:
            raise ValueError(f"input_values must be (B, samples), got {tuple(input_values.shape)}")
        x = self.project(self.subsample(input_values))  # (B, T, D)
        frames = None if attention_mask is None else self.frame_mask(attention_mask, x.shape[1])
        if mask_time_indices is not None:
            if self.mask_embedding is None:
                raise ValueError(
                    "mask_time_indices given to a model without a mask embedding (mask_time_prob=0)"
                )
            if mask_time_indices.shape != x.shape[:2]:
                raise ValueError(
                    f"mask_time_indices must be (B, frames) = {tuple(x.shape[:2])}, got {tuple(mask_time_indices.shape)}"
                )
            x = torch.where(mask_time_indices.bool()[..., None], self.mask_embedding.to(x.dtype), x)
        if frames is not None:
            x = x.masked_fill(~frames[..., None], 0.0)
        positions = relative_positions(x.shape[1], self.config.d_model, x.device).to(x.dtype)
        x = self.blocks(self.drop(x), positions=positions, key_padding_mask=key_padding(frames))
        return self.norm(x), frames

    def forward(
        self,
        input_values: Tensor,
        attention_mask: Tensor | None = None,
        mask_time_indices: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> ModelOutput:
        """labels: (B, T) or (B, T, num_codebooks) codebook indices of the masked frames, -100 elsewhere.
        With labels, logits are (num_labelled_frames, num_codebooks, vocab) for those frames only, rows in
        row-major order (as BERT's); without, (B, T, num_codebooks, vocab)."""
        x, _ = self.encode(input_values, attention_mask, mask_time_indices)
        shape = (self.config.num_codebooks, self.config.vocab_size)
        if labels is None:
            return ModelOutput(logits=self.head(x).unflatten(-1, shape))
        if labels.dim() == 2:
            labels = labels.unsqueeze(-1)
        if labels.shape != (*x.shape[:2], shape[0]):
            raise ValueError(
                f"labels must be (B, frames[, num_codebooks]) = {(*x.shape[:2], shape[0])}, got {tuple(labels.shape)}"
            )
        picked = (labels != -100).any(-1)
        logits = self.head(x[picked]).unflatten(-1, shape)  # (n, K, V)
        return ModelOutput(logits=logits, loss=cross_entropy(logits, labels[picked]))

    def features(self, input_values: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The encoder over unmasked audio, (B, T, D)."""
        return self.encode(input_values, attention_mask)[0]

    def transformer_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The mask embedding: substituted, not multiplied."""
        return [] if self.mask_embedding is None else [self.mask_embedding]

    def flops_per_token(self, seq_len: SampleShape | int | None = None) -> float:
        """Training FLOPs per frame: each conv layer's weights once per output step it makes per frame, the
        rest 6 N per frame, attention 12 L d T (+ the same again for the relative-position scores) at
        T = seq_len frames (the relative-position projection runs over 2 T - 1 positions, ~2 T); a SampleShape
        gives T as its input_len, as the text families take it."""
        cfg = self.config
        t = seq_len.input_len if isinstance(seq_len, SampleShape) else (seq_len or 1)
        conv, steps = 0.0, math.prod(cfg.conv_stride)
        for layer, stride in zip(self.subsample.layers, cfg.conv_stride):
            steps //= stride
            conv += steps * sum(p.numel() for p in layer.parameters())
        rest = self.num_parameters(exclude_embeddings=True) - sum(
            p.numel() for p in self.subsample.parameters()
        )
        return 6.0 * (conv + rest) + 2 * 12.0 * cfg.n_layers * cfg.d_model * t

    def init_weights(self, seed: int | None = None) -> None:
        """wav2vec2-conformer's scheme: N(0, init_std) linear layers, Kaiming-normal convolutions, Xavier u and
        v, the feature projection U(+-1/sqrt(fan-in)), the mask embedding U(0, 1)."""
        if seed is not None:  # drawn from the global RNG (these families are not built sharded yet)
            torch.manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=self.config.init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv1d):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    bound = math.sqrt(module.groups / (module.in_channels * module.kernel_size[0]))
                    nn.init.uniform_(module.bias, -bound, bound)
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)):
                module.reset_parameters()
            elif isinstance(module, RelPositionAttention):
                nn.init.xavier_uniform_(module.pos_bias_u)
                nn.init.xavier_uniform_(module.pos_bias_v)
        bound = 1 / math.sqrt(self.project.linear.in_features)
        nn.init.uniform_(self.project.linear.weight, -bound, bound)
        nn.init.uniform_(self.project.linear.bias, -bound, bound)
        if self.mask_embedding is not None:
            nn.init.uniform_(self.mask_embedding)
