"""Conversion to and from transformers: GPT2LMHeadModel, BertForMaskedLM, T5ForConditionalGeneration,
ViTMAEForPreTraining, ViTForMaskedImageModeling, SwinForMaskedImageModeling and Wav2Vec2ConformerModel.

Our models keep their own parameter names (fused QKV, fused gated FF, nn.Linear layout); a list of
`Rule`s per family maps each of our tensors to the HF tensors it is made of, and the same rules run in
both directions. transformers is imported only when converting *to* it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from models.attention import is_approximate
from models.base import LanguageModel
from models.build import build_from_config
from models.config import (
    BERTConfig,
    ConformerConfig,
    GPTConfig,
    ModelConfig,
    SwinConfig,
    T5Config,
    ViTMAEConfig,
    ViTSimMIMConfig,
    _ViTConfig,
)

# Activation names in transformers' ACT2FN that equal one of ours (within fp32 rounding).
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACT_FROM_HF.update(swish="silu", silu="silu")
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "swish"}


@dataclass(frozen=True)
class Rule:
    """Our tensor `ours` = the HF tensors `theirs` (each transposed if `transpose`) stacked along dim 0."""

    ours: str
    theirs: tuple[str, ...]
    transpose: bool = False


def _rule(ours: str, *theirs: str, transpose: bool = False) -> Rule:
    return Rule(ours, theirs, transpose)


def _activation_from_hf(name: str, where: str) -> str:
    if name not in _ACT_FROM_HF:
        raise ValueError(
            f"{where}: activation {name!r} is not supported; accepted: {', '.join(_ACT_FROM_HF)}"
        )
    return _ACT_FROM_HF[name]


def _first_set(*values: int | None) -> int:
    return next(v for v in values if v is not None)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


# --- GPT-2 --------------------------------------------------------------------------------------------


def _gpt_config(hf: Any) -> GPTConfig:
    _require(hf.scale_attn_weights, "GPT2 with scale_attn_weights=False is not supported")
    _require(
        not hf.scale_attn_by_inverse_layer_idx, "GPT2 with scale_attn_by_inverse_layer_idx is not supported"
    )
    _require(not hf.add_cross_attention, "GPT2 with add_cross_attention is not supported")
    eos = hf.eos_token_id if hf.eos_token_id is not None else 0
    return GPTConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.n_embd,
        n_layers=hf.n_layer,
        n_heads=hf.n_head,
        d_ff=hf.n_inner or 4 * hf.n_embd,
        max_seq_len=hf.n_positions,
        activation=_activation_from_hf(hf.activation_function, "GPT2 activation_function"),
        layer_norm_eps=hf.layer_norm_epsilon,
        dropout=hf.resid_pdrop,
        attention_dropout=hf.attn_pdrop,
        init_std=hf.initializer_range,
        bos_token_id=hf.bos_token_id if hf.bos_token_id is not None else eos,
        eos_token_id=eos,
        pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else eos,
    )


def _gpt_hf_config(cfg: GPTConfig) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_ff,
        n_positions=cfg.max_seq_len,
        activation_function=_ACT_TO_HF[cfg.activation],
        layer_norm_epsilon=cfg.layer_norm_eps,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.attention_dropout,
        initializer_range=cfg.init_std,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )


def _gpt_rules(cfg: GPTConfig) -> list[Rule]:
    rules = [
        _rule("embed.tokens.weight", "transformer.wte.weight"),
        _rule("embed.positions.weight", "transformer.wpe.weight"),
        _rule("norm.weight", "transformer.ln_f.weight"),
        _rule("norm.bias", "transformer.ln_f.bias"),
    ]
    for i in range(cfg.n_layers):
        ours, hf = f"blocks.{i}", f"transformer.h.{i}"
        for mine, theirs in (("attn_norm", "ln_1"), ("ff_norm", "ln_2")):
            rules += [_rule(f"{ours}.{mine}.{p}", f"{hf}.{theirs}.{p}") for p in ("weight", "bias")]
        for mine, theirs in (
            ("attn.qkv", "attn.c_attn"),
            ("attn.out", "attn.c_proj"),
            ("ff.up", "mlp.c_fc"),
            ("ff.down", "mlp.c_proj"),
        ):
            rules.append(_rule(f"{ours}.{mine}.weight", f"{hf}.{theirs}.weight", transpose=True))  # Conv1D
            rules.append(_rule(f"{ours}.{mine}.bias", f"{hf}.{theirs}.bias"))
    return rules


# --- BERT ---------------------------------------------------------------------------------------------


def _bert_config(hf: Any) -> BERTConfig:
    _require(not hf.is_decoder and not hf.add_cross_attention, "BERT as a decoder is not supported")
    position = getattr(hf, "position_embedding_type", "absolute")
    _require(position == "absolute", f"BERT position_embedding_type={position!r} is not supported")
    return BERTConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        d_ff=hf.intermediate_size,
        max_seq_len=hf.max_position_embeddings,
        type_vocab_size=hf.type_vocab_size,
        activation=_activation_from_hf(hf.hidden_act, "BERT hidden_act"),
        layer_norm_eps=hf.layer_norm_eps,
        dropout=hf.hidden_dropout_prob,
        attention_dropout=hf.attention_probs_dropout_prob,
        init_std=hf.initializer_range,
        pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
    )


def _bert_hf_config(cfg: BERTConfig) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_ff,
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=cfg.type_vocab_size,
        hidden_act=_ACT_TO_HF[cfg.activation],
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        initializer_range=cfg.init_std,
        pad_token_id=cfg.pad_token_id,
    )


def _linear(ours: str, *theirs: str) -> list[Rule]:
    return [_rule(f"{ours}.{p}", *(f"{t}.{p}" for t in theirs)) for p in ("weight", "bias")]


def _bert_rules(cfg: BERTConfig) -> list[Rule]:
    emb = "bert.embeddings"
    rules = [
        _rule("embed.tokens.weight", f"{emb}.word_embeddings.weight"),
        _rule("embed.positions.weight", f"{emb}.position_embeddings.weight"),
        _rule("embed.token_types.weight", f"{emb}.token_type_embeddings.weight"),
        *_linear("embed.norm", f"{emb}.LayerNorm"),
        *_linear("head.transform", "cls.predictions.transform.dense"),
        *_linear("head.norm", "cls.predictions.transform.LayerNorm"),
        _rule("head.bias", "cls.predictions.bias"),
    ]
    for i in range(cfg.n_layers):
        ours, hf = f"blocks.{i}", f"bert.encoder.layer.{i}"
        rules += [
            *_linear(f"{ours}.attn.qkv", *(f"{hf}.attention.self.{n}" for n in ("query", "key", "value"))),
            *_linear(f"{ours}.attn.out", f"{hf}.attention.output.dense"),
            *_linear(f"{ours}.attn_norm", f"{hf}.attention.output.LayerNorm"),
            *_linear(f"{ours}.ff.up", f"{hf}.intermediate.dense"),
            *_linear(f"{ours}.ff.down", f"{hf}.output.dense"),
            *_linear(f"{ours}.ff_norm", f"{hf}.output.LayerNorm"),
        ]
    return rules


# --- T5 -----------------------------------------------------------------------------------------------


def _t5_config(hf: Any) -> T5Config:
    # transformers >= 5 ties the head always and records v1.0's logit scaling as `scale_decoder_outputs`.
    scaled = getattr(hf, "scale_decoder_outputs", hf.tie_word_embeddings)
    return T5Config(
        vocab_size=hf.vocab_size,
        d_model=hf.d_model,
        d_kv=hf.d_kv,
        d_ff=hf.d_ff,
        n_layers=hf.num_layers,
        n_decoder_layers=hf.num_decoder_layers,
        n_heads=hf.num_heads,
        relative_buckets=hf.relative_attention_num_buckets,
        relative_max_distance=hf.relative_attention_max_distance,
        activation=_activation_from_hf(hf.dense_act_fn, "T5 feed_forward_proj"),
        gated=hf.is_gated_act,
        tie_embeddings=bool(scaled),
        layer_norm_eps=hf.layer_norm_epsilon,
        dropout=hf.dropout_rate,
        attention_dropout=hf.dropout_rate,
        init_std=hf.initializer_factor,
        pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
        eos_token_id=hf.eos_token_id if hf.eos_token_id is not None else 1,
        # transformers >= 5 keeps decoder_start_token_id only when given; T5 starts with the pad token.
        decoder_start_token_id=_first_set(getattr(hf, "decoder_start_token_id", None), hf.pad_token_id, 0),
    )


def _t5_hf_config(cfg: T5Config) -> Any:
    from transformers import T5Config as HFT5Config

    _require(
        cfg.dropout == cfg.attention_dropout, "T5 to_hf needs dropout == attention_dropout (one dropout_rate)"
    )
    if cfg.gated:
        _require(
            cfg.activation == "gelu_tanh" or cfg.activation == "relu",
            "T5 to_hf: gated exact GELU has no HF name",
        )
        proj = "gated-gelu" if cfg.activation == "gelu_tanh" else "gated-relu"
    else:
        proj = _ACT_TO_HF[cfg.activation]
    return HFT5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.n_layers,
        num_decoder_layers=cfg.n_decoder_layers,
        num_heads=cfg.n_heads,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        feed_forward_proj=proj,
        tie_word_embeddings=cfg.tie_embeddings,
        layer_norm_epsilon=cfg.layer_norm_eps,
        dropout_rate=cfg.dropout,
        initializer_factor=cfg.init_std,
        pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id,
        decoder_start_token_id=cfg.decoder_start_token_id,
    )


def _t5_block_rules(ours: str, hf: str, *, decoder: bool, gated: bool) -> list[Rule]:
    attn = f"{hf}.layer.0.SelfAttention"
    rules = [
        _rule(f"{ours}.attn_norm.weight", f"{hf}.layer.0.layer_norm.weight"),
        _rule(f"{ours}.attn.qkv.weight", f"{attn}.q.weight", f"{attn}.k.weight", f"{attn}.v.weight"),
        _rule(f"{ours}.attn.out.weight", f"{attn}.o.weight"),
    ]
    if decoder:
        cross = f"{hf}.layer.1.EncDecAttention"
        rules += [
            _rule(f"{ours}.cross_norm.weight", f"{hf}.layer.1.layer_norm.weight"),
            _rule(f"{ours}.cross_attn.q.weight", f"{cross}.q.weight"),
            _rule(f"{ours}.cross_attn.kv.weight", f"{cross}.k.weight", f"{cross}.v.weight"),
            _rule(f"{ours}.cross_attn.out.weight", f"{cross}.o.weight"),
        ]
    ff = f"{hf}.layer.{2 if decoder else 1}"
    up = (
        (f"{ff}.DenseReluDense.wi_0.weight", f"{ff}.DenseReluDense.wi_1.weight")
        if gated
        else (f"{ff}.DenseReluDense.wi.weight",)
    )
    return rules + [
        _rule(f"{ours}.ff_norm.weight", f"{ff}.layer_norm.weight"),
        _rule(f"{ours}.ff.up.weight", *up),
        _rule(f"{ours}.ff.down.weight", f"{ff}.DenseReluDense.wo.weight"),
    ]


def _t5_rules(cfg: T5Config) -> list[Rule]:
    rules = [_rule("embed.tokens.weight", "shared.weight")]
    for stack, n in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers)):
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        rules += [
            _rule(f"{stack}_bias.table.weight", bias),
            _rule(f"{stack}_norm.weight", f"{stack}.final_layer_norm.weight"),
        ]
        for i in range(n):
            rules += _t5_block_rules(
                f"{stack}.{i}", f"{stack}.block.{i}", decoder=stack == "decoder", gated=cfg.gated
            )
    if not cfg.tie_embeddings:
        rules.append(_rule("lm_head.weight", "lm_head.weight"))
    return rules


# --- ViT (MAE, SimMIM) and Swin -----------------------------------------------------------------------


def _square(value: Any, name: str) -> int:
    """transformers allows (height, width) sizes; ours are square."""
    if isinstance(value, (list, tuple)):
        _require(len(set(value)) == 1, f"{name}={tuple(value)}: only square sizes are supported")
        return int(value[0])
    return int(value)


def _image_fields(hf: Any, where: str) -> dict[str, Any]:
    _require(hf.qkv_bias, f"{where} with qkv_bias=False is not supported")
    return dict(
        image_size=_square(hf.image_size, f"{where} image_size"),
        patch_size=_square(hf.patch_size, f"{where} patch_size"),
        num_channels=hf.num_channels,
        activation=_activation_from_hf(hf.hidden_act, f"{where} hidden_act"),
        layer_norm_eps=hf.layer_norm_eps,
        dropout=hf.hidden_dropout_prob,
        attention_dropout=hf.attention_probs_dropout_prob,
        init_std=hf.initializer_range,
    )


def _image_hf_fields(cfg: Any) -> dict[str, Any]:
    return dict(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.num_channels,
        hidden_act=_ACT_TO_HF[cfg.activation],
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        initializer_range=cfg.init_std,
        qkv_bias=True,
    )


def _vit_fields(hf: Any, where: str) -> dict[str, Any]:
    return dict(
        **_image_fields(hf, where),
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        d_ff=hf.intermediate_size,
    )


def _vit_hf_fields(cfg: _ViTConfig) -> dict[str, Any]:
    return dict(
        **_image_hf_fields(cfg),
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_ff,
    )


def _vit_mae_config(hf: Any) -> ViTMAEConfig:
    return ViTMAEConfig(
        **_vit_fields(hf, "ViTMAE"),
        decoder_d_model=hf.decoder_hidden_size,
        decoder_n_layers=hf.decoder_num_hidden_layers,
        decoder_n_heads=hf.decoder_num_attention_heads,
        decoder_d_ff=hf.decoder_intermediate_size,
        mask_ratio=hf.mask_ratio,
        norm_pix_loss=hf.norm_pix_loss,
    )


def _vit_mae_hf_config(cfg: ViTMAEConfig) -> Any:
    from transformers import ViTMAEConfig as HFViTMAEConfig

    return HFViTMAEConfig(
        **_vit_hf_fields(cfg),
        decoder_hidden_size=cfg.decoder_d_model,
        decoder_num_hidden_layers=cfg.decoder_n_layers,
        decoder_num_attention_heads=cfg.decoder_n_heads,
        decoder_intermediate_size=cfg.decoder_d_ff,
        mask_ratio=cfg.mask_ratio,
        norm_pix_loss=cfg.norm_pix_loss,
    )


def _vit_simmim_config(hf: Any) -> ViTSimMIMConfig:
    cfg = ViTSimMIMConfig(**_vit_fields(hf, "ViT"))
    _require(
        hf.encoder_stride == cfg.patch_size,
        f"ViT with encoder_stride={hf.encoder_stride} != patch_size={cfg.patch_size} is not supported",
    )
    return cfg


def _vit_simmim_hf_config(cfg: ViTSimMIMConfig) -> Any:
    from transformers import ViTConfig

    return ViTConfig(**_vit_hf_fields(cfg), encoder_stride=cfg.patch_size)


def _pre_norm_block_rules(ours: str, hf: str) -> list[Rule]:
    """ViT's, ViT-MAE's and Swin's layers, all with transformers' before/after LayerNorm names."""
    attn = f"{hf}.attention"
    return [
        *_linear(f"{ours}.attn_norm", f"{hf}.layernorm_before"),
        *_linear(f"{ours}.attn.qkv", f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"),
        *_linear(f"{ours}.attn.out", f"{attn}.o_proj"),
        *_linear(f"{ours}.ff_norm", f"{hf}.layernorm_after"),
        *_linear(f"{ours}.ff.up", f"{hf}.mlp.fc1"),
        *_linear(f"{ours}.ff.down", f"{hf}.mlp.fc2"),
    ]


def _vit_encoder_rules(cfg: _ViTConfig) -> list[Rule]:
    emb = "vit.embeddings"
    rules = [
        _rule("encoder.cls_token", f"{emb}.cls_token"),
        _rule("encoder.positions", f"{emb}.position_embeddings"),
        *_linear("encoder.patch.proj", f"{emb}.patch_embeddings.projection"),
        *_linear("encoder.norm", "vit.layernorm"),
    ]
    for i in range(cfg.n_layers):
        rules += _pre_norm_block_rules(f"encoder.blocks.{i}", f"vit.layers.{i}")
    return rules


def _vit_mae_rules(cfg: ViTMAEConfig) -> list[Rule]:
    rules = _vit_encoder_rules(cfg) + [
        *_linear("decoder.embed", "decoder.decoder_embed"),
        _rule("decoder.mask_token", "decoder.mask_token"),
        _rule("decoder.positions", "decoder.decoder_pos_embed"),
        *_linear("decoder.norm", "decoder.decoder_norm"),
        *_linear("decoder.pred", "decoder.decoder_pred"),
    ]
    for i in range(cfg.decoder_n_layers):
        rules += _pre_norm_block_rules(f"decoder.blocks.{i}", f"decoder.decoder_layers.{i}")
    return rules


def _vit_simmim_rules(cfg: ViTSimMIMConfig) -> list[Rule]:
    return _vit_encoder_rules(cfg) + [
        _rule("encoder.mask_token", "vit.embeddings.mask_token"),
        *_linear("head.proj", "decoder.0"),
    ]


def _swin_config(hf: Any) -> SwinConfig:
    cfg = SwinConfig(
        **_image_fields(hf, "Swin"),
        d_model=hf.embed_dim,
        depths=tuple(hf.depths),
        stage_heads=tuple(hf.num_heads),
        window_size=hf.window_size,
        mlp_ratio=hf.mlp_ratio,
        absolute_positions=hf.use_absolute_embeddings,
        drop_path=hf.drop_path_rate,
    )
    _require(
        hf.encoder_stride == cfg.stride,
        f"Swin with encoder_stride={hf.encoder_stride} (the last stage's stride is {cfg.stride}) is not supported",
    )
    return cfg


def _swin_hf_config(cfg: SwinConfig) -> Any:
    from transformers import SwinConfig as HFSwinConfig

    return HFSwinConfig(
        **_image_hf_fields(cfg),
        embed_dim=cfg.d_model,
        depths=list(cfg.depths),
        num_heads=list(cfg.stage_heads),
        window_size=cfg.window_size,
        mlp_ratio=cfg.mlp_ratio,
        use_absolute_embeddings=cfg.absolute_positions,
        drop_path_rate=cfg.drop_path,
        encoder_stride=cfg.stride,
    )


def _swin_rules(cfg: SwinConfig) -> list[Rule]:
    emb = "swin.embeddings"
    rules = [
        *_linear("patch.proj", f"{emb}.patch_embeddings.projection"),
        *_linear("patch_norm", f"{emb}.norm"),
        _rule("mask_token", f"{emb}.mask_token"),
        *_linear("norm", "swin.layernorm"),
        *_linear("head.proj", "decoder.0"),
    ]
    if cfg.absolute_positions:
        rules.append(_rule("positions", f"{emb}.position_embeddings"))
    for s, depth in enumerate(cfg.depths):
        ours, hf = f"stages.{s}", f"swin.encoder.layers.{s}"
        for i in range(depth):
            rules += _pre_norm_block_rules(f"{ours}.blocks.{i}", f"{hf}.blocks.{i}")
            table = f"{hf}.blocks.{i}.attention.relative_position_bias.relative_position_bias_table"
            rules.append(_rule(f"{ours}.blocks.{i}.attn.relative_bias", table))
        if s < len(cfg.depths) - 1:
            rules.append(_rule(f"{ours}.merge.reduction.weight", f"{hf}.downsample.reduction.weight"))
            rules += _linear(f"{ours}.merge.norm", f"{hf}.downsample.norm")
    return rules


# --- Conformer (wav2vec2-conformer's encoder) ---------------------------------------------------------


def _conformer_config(hf: Any) -> ConformerConfig:
    _require(
        hf.position_embeddings_type == "relative",
        f"Wav2Vec2Conformer position_embeddings_type={hf.position_embeddings_type!r} is not supported",
    )
    _require(not hf.add_adapter, "Wav2Vec2Conformer with add_adapter is not supported")
    _require(
        hf.mask_time_prob > 0 or hf.mask_feature_prob == 0,
        "Wav2Vec2Conformer with feature masking only (mask_time_prob=0) is not supported",
    )
    return ConformerConfig(
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        d_ff=hf.intermediate_size,
        activation=_activation_from_hf(hf.hidden_act, "Wav2Vec2Conformer hidden_act"),
        layer_norm_eps=hf.layer_norm_eps,
        conv_dim=tuple(hf.conv_dim),
        conv_kernel=tuple(hf.conv_kernel),
        conv_stride=tuple(hf.conv_stride),
        conv_bias=hf.conv_bias,
        feature_norm=hf.feat_extract_norm,
        feature_activation=_activation_from_hf(
            hf.feat_extract_activation, "Wav2Vec2Conformer feat_extract_activation"
        ),
        depthwise_kernel=hf.conv_depthwise_kernel_size,
        mask_time_prob=hf.mask_time_prob,
        mask_time_length=hf.mask_time_length,
        dropout=hf.hidden_dropout,
        attention_dropout=hf.attention_dropout,
        init_std=hf.initializer_range,
    )


def _conformer_hf_config(cfg: ConformerConfig) -> Any:
    import math

    from transformers import Wav2Vec2ConformerConfig

    return Wav2Vec2ConformerConfig(
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_ff,
        hidden_act=_ACT_TO_HF[cfg.activation],
        layer_norm_eps=cfg.layer_norm_eps,
        conv_dim=list(cfg.conv_dim),
        conv_kernel=list(cfg.conv_kernel),
        conv_stride=list(cfg.conv_stride),
        conv_bias=cfg.conv_bias,
        feat_extract_norm=cfg.feature_norm,
        feat_extract_activation=_ACT_TO_HF[cfg.feature_activation],
        conv_depthwise_kernel_size=cfg.depthwise_kernel,
        mask_time_prob=cfg.mask_time_prob,
        mask_time_length=cfg.mask_time_length,
        hidden_dropout=cfg.dropout,
        activation_dropout=cfg.dropout,
        feat_proj_dropout=cfg.dropout,
        conformer_conv_dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        layerdrop=0.0,
        initializer_range=cfg.init_std,
        position_embeddings_type="relative",
        # transformers builds a positional convolution the conformer encoder never runs; keep it valid.
        num_conv_pos_embedding_groups=math.gcd(16, cfg.d_model),
    )


def _conformer_rules(cfg: ConformerConfig) -> list[Rule]:
    rules = [
        *_linear("project.norm", "feature_projection.layer_norm"),
        *_linear("project.linear", "feature_projection.projection"),
        *_linear("norm", "encoder.layer_norm"),
    ]
    if cfg.mask_time_prob > 0:
        rules.append(_rule("mask_embedding", "masked_spec_embed"))
    for i in range(len(cfg.conv_dim)):
        ours, hf = f"subsample.layers.{i}", f"feature_extractor.conv_layers.{i}"
        rules += (
            _linear(f"{ours}.conv", f"{hf}.conv")
            if cfg.conv_bias
            else [_rule(f"{ours}.conv.weight", f"{hf}.conv.weight")]
        )
        if cfg.feature_norm == "layer" or i == 0:
            rules += _linear(f"{ours}.norm", f"{hf}.layer_norm")
    batch_norm = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    for i in range(cfg.n_layers):
        ours, hf = f"blocks.{i}", f"encoder.layers.{i}"
        attn, conv = f"{hf}.self_attn", f"{hf}.conv_module"
        rules += [
            *_linear(f"{ours}.ff1_norm", f"{hf}.ffn1_layer_norm"),
            *_linear(f"{ours}.ff1.up", f"{hf}.ffn1.intermediate_dense"),
            *_linear(f"{ours}.ff1.down", f"{hf}.ffn1.output_dense"),
            *_linear(f"{ours}.attn_norm", f"{hf}.self_attn_layer_norm"),
            *_linear(f"{ours}.attn.qkv", f"{attn}.linear_q", f"{attn}.linear_k", f"{attn}.linear_v"),
            *_linear(f"{ours}.attn.out", f"{attn}.linear_out"),
            _rule(f"{ours}.attn.pos.weight", f"{attn}.linear_pos.weight"),
            _rule(f"{ours}.attn.pos_bias_u", f"{attn}.pos_bias_u"),
            _rule(f"{ours}.attn.pos_bias_v", f"{attn}.pos_bias_v"),
            *_linear(f"{ours}.conv.norm", f"{conv}.layer_norm"),
            _rule(f"{ours}.conv.pointwise_in.weight", f"{conv}.pointwise_conv1.weight"),
            _rule(f"{ours}.conv.depthwise.weight", f"{conv}.depthwise_conv.weight"),
            *(_rule(f"{ours}.conv.batch_norm.{n}", f"{conv}.batch_norm.{n}") for n in batch_norm),
            _rule(f"{ours}.conv.pointwise_out.weight", f"{conv}.pointwise_conv2.weight"),
            *_linear(f"{ours}.ff2_norm", f"{hf}.ffn2_layer_norm"),
            *_linear(f"{ours}.ff2.up", f"{hf}.ffn2.intermediate_dense"),
            *_linear(f"{ours}.ff2.down", f"{hf}.ffn2.output_dense"),
            *_linear(f"{ours}.out_norm", f"{hf}.final_layer_norm"),
        ]
    return rules


# --- the generic part ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    hf_class: str
    from_hf_config: Callable[[Any], ModelConfig]
    to_hf_config: Callable[[Any], Any]
    rules: Callable[[Any], list[Rule]]
    tied: dict[str, str]  # HF alias key -> the HF key it is tied to (aliases are not read; tying fills them)
    unused: tuple[str, ...] = ()  # HF key prefixes its forward never uses: not read, left at HF's init
    ours_only: tuple[
        str, ...
    ] = ()  # our key prefixes with no HF twin (training heads): kept at init, not exported
    prefix: str = ""  # the base model's attribute: checkpoints saved from the base class lack it
    vocabulary: tuple[str, ...] = ()  # our tensors with a row per token (padded past it: vocab_multiple)


_FAMILIES = {
    "gpt": _Family(
        "GPT2LMHeadModel",
        _gpt_config,
        _gpt_hf_config,
        _gpt_rules,
        {"lm_head.weight": "transformer.wte.weight"},
        prefix="transformer.",
        vocabulary=("embed.tokens.weight",),
    ),
    "bert": _Family(
        "BertForMaskedLM",
        _bert_config,
        _bert_hf_config,
        _bert_rules,
        {
            "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias",
        },
        prefix="bert.",
        vocabulary=("embed.tokens.weight", "head.bias"),
    ),
    "t5": _Family(
        "T5ForConditionalGeneration",
        _t5_config,
        _t5_hf_config,
        _t5_rules,
        {
            "encoder.embed_tokens.weight": "shared.weight",
            "decoder.embed_tokens.weight": "shared.weight",
            "lm_head.weight": "shared.weight",  # read as our own head when the config is untied (v1.1)
        },
        vocabulary=("embed.tokens.weight", "lm_head.weight"),
    ),
    "vit_mae": _Family("ViTMAEForPreTraining", _vit_mae_config, _vit_mae_hf_config, _vit_mae_rules, {}),
    "vit_simmim": _Family(
        "ViTForMaskedImageModeling", _vit_simmim_config, _vit_simmim_hf_config, _vit_simmim_rules, {}
    ),
    "swin": _Family("SwinForMaskedImageModeling", _swin_config, _swin_hf_config, _swin_rules, {}),
    "conformer": _Family(
        "Wav2Vec2ConformerModel",
        _conformer_config,
        _conformer_hf_config,
        _conformer_rules,
        {},
        unused=("encoder.pos_conv_embed.",),
        ours_only=("head.",),
    ),
}


def _family_of_hf(hf_model: nn.Module) -> str:
    name = type(hf_model).__name__
    for family, spec in _FAMILIES.items():
        if spec.hf_class == name:
            return family
    accepted = ", ".join(spec.hf_class for spec in _FAMILIES.values())
    raise ValueError(f"from_hf: unsupported model class {name}; accepted: {accepted}")


def assemble(rule: Rule, parts: Sequence[Tensor]) -> Tensor:
    """Our tensor from its HF parts (`rule.theirs`, in order): each transposed for GPT-2's Conv1D, stacked
    along dim 0 for a fused projection. A single untransposed part is returned as it is (no copy)."""
    parts = [p.t() if rule.transpose else p for p in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def assembled_shape(rule: Rule, shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The shape `assemble` gives for parts of these shapes, without reading them."""
    shapes = [tuple(s)[::-1] if rule.transpose else tuple(s) for s in shapes]
    return (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else shapes[0]


def convert_from_hf(rules: list[Rule], hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict from an HF one."""
    out = {}
    for r in rules:
        tensor = assemble(r, [hf_state[n] for n in r.theirs])
        out[r.ours] = tensor.clone() if len(r.theirs) == 1 else tensor
    return out


@dataclass(frozen=True)
class WeightMap:
    """How a transformers checkpoint's tensors make ours, to read them one at a time without building the
    transformers model (`from_hf` needs it whole): the same rules and tied aliases `from_hf` uses."""

    rules: list[Rule]
    tied: dict[str, str]  # HF alias -> the HF key it is tied to: not read, must equal it where saved
    prefix: str  # see `stored_names`

    def stored_names(self, key: str) -> tuple[str, ...]:
        """The names a checkpoint may store HF `key` under, as `from_pretrained` accepts them: its own; without
        the base model's prefix (saved from the base class, e.g. the published gpt2's `h.0.attn.c_attn.weight`);
        LayerNorm's old `gamma`/`beta` (e.g. bert-base-uncased)."""
        names = [key]
        if self.prefix and key.startswith(self.prefix):
            names.append(key[len(self.prefix) :])
        for new, old in ((".weight", ".gamma"), (".bias", ".beta")):
            if "LayerNorm" in key and key.endswith(new):
                names += [n[: -len(new)] + old for n in names]
        return tuple(names)


def vocabulary_tensors(family: str) -> tuple[str, ...]:
    """Our parameters of `family` with one row per token: rows a padded vocabulary (`vocab_multiple`) adds and
    a conversion to transformers leaves out, the ones `model.init_from` may resize."""
    return _FAMILIES[family].vocabulary


def weight_map(config: ModelConfig) -> WeightMap:
    """The conversion rules of `config`'s family (a model `from_hf` would build from that config)."""
    spec = _FAMILIES[config.family]
    return WeightMap(spec.rules(config), dict(spec.tied), spec.prefix)


def convert_to_hf(rules: list[Rule], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An HF state dict from ours (tied HF aliases left out)."""
    out = {}
    for r in rules:
        tensor = state[r.ours]
        parts = (tensor,) if len(r.theirs) == 1 else tensor.chunk(len(r.theirs), dim=0)  # 0-dim buffers too
        for name, part in zip(r.theirs, parts):
            out[name] = (part.t() if r.transpose else part).contiguous()
    return out


HF_MODEL_TYPES = {"gpt2": "gpt", "bert": "bert", "t5": "t5"}  # config.json `model_type` -> our family
HF_CLASSES = {family: spec.hf_class for family, spec in _FAMILIES.items()}


def config_from_hf(hf_config: Any) -> ModelConfig:
    """Our model config for a transformers config (GPT2Config, BertConfig, T5Config): ValueError if unsupported."""
    family = HF_MODEL_TYPES.get(getattr(hf_config, "model_type", ""))
    if family is None:
        accepted = ", ".join(HF_MODEL_TYPES)
        raise ValueError(f"model_type {hf_config.model_type!r} is not supported; accepted: {accepted}")
    return _FAMILIES[family].from_hf_config(hf_config)


def from_hf(hf_model: nn.Module, attention: str = "auto") -> LanguageModel:
    """Our model with the same architecture and weights as `hf_model` (same dtype and device)."""
    family = _family_of_hf(hf_model)
    spec = _FAMILIES[family]
    config = spec.from_hf_config(hf_model.config)
    config = dataclasses.replace(config, attention=attention)  # validates the backend name
    rules = spec.rules(config)
    hf_state = hf_model.state_dict()
    read = {n for r in rules for n in r.theirs}
    unused = {k for k in set(hf_state) - read - set(spec.tied) if not k.startswith(spec.unused)}
    if unused:
        raise ValueError(
            f"from_hf: {spec.hf_class} has weights we cannot map: {', '.join(sorted(unused)[:5])}"
        )
    for alias, source in spec.tied.items():
        # An alias we do not read must really be tied, or we would silently drop its values.
        if alias in hf_state and alias not in read and not torch.equal(hf_state[alias], hf_state[source]):
            raise ValueError(f"from_hf: {alias} differs from {source}; this untied variant is not supported")
    param = next(hf_model.parameters())
    model = build_from_config(config, init=False).to(device=param.device, dtype=param.dtype)
    missing, unexpected = model.load_state_dict(convert_from_hf(rules, hf_state), strict=False)
    missing = [k for k in missing if not k.startswith(spec.ours_only)]
    if missing or unexpected:
        raise ValueError(f"from_hf: state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model


def to_hf(model: LanguageModel) -> nn.Module:
    """The matching transformers model (eval mode), with our weights copied in."""
    import transformers

    spec = _FAMILIES[model.config.family]
    _require(
        model.config.attention_window is None, "to_hf: transformers has no sliding-window attention here"
    )
    what = "reversible layers" if model.config.reversible else f"attention={model.config.attention!r}"
    _require(
        not is_approximate(model.config.attention) and not model.config.reversible,
        f"to_hf: {what} has no {spec.hf_class} equivalent",
    )
    _require(
        getattr(model.config, "positions", "learned") == "learned",
        "to_hf: transformers needs learned positions",
    )
    hf_model = getattr(transformers, spec.hf_class)(spec.to_hf_config(model.config))
    if isinstance(model.config, T5Config) and not model.config.tie_embeddings:
        # transformers >= 5 always ties T5's head; v1.1 needs its own (from_pretrained unties it likewise).
        hf_model.lm_head.weight = nn.Parameter(hf_model.lm_head.weight.detach().clone())
        getattr(hf_model, "all_tied_weights_keys", {}).pop("lm_head.weight", None)
    param = next(model.parameters())
    hf_model.to(device=param.device, dtype=param.dtype)
    state = model.state_dict()
    for name in spec.vocabulary:  # transformers has the vocabulary's rows, not the padding's
        if name in state:
            state[name] = state[name][: model.config.vocab_size]
    missing, unexpected = hf_model.load_state_dict(
        convert_to_hf(spec.rules(model.config), state), strict=False
    )
    bad = [k for k in missing if k not in spec.tied and not k.startswith(spec.unused)]
    if bad or unexpected:
        raise ValueError(f"to_hf: state dict mismatch: missing {bad}, unexpected {unexpected}")
    return hf_model.eval()
