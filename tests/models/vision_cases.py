"""Tiny randomly initialised transformers image and speech models (no downloads) with fixed masks and noise,
shared by the parity tests of the image and speech families."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

TOL = 1e-5  # max |ours - theirs| / max |theirs|, fp32
BACKENDS = ["eager", "sdpa", "chunked"]


@dataclass
class MediaCase:
    """A transformers model, the inputs for both it and ours (HF keyword names), and which output to compare."""

    model: torch.nn.Module
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def randomise(model: torch.nn.Module, *names: str, std: float = 0.5) -> torch.nn.Module:
    """Parameters transformers initialises to zero (position biases, tokens) get random values, so that
    a mapping mistake in them cannot hide."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(n in name for n in names):
                param.normal_(0.0, std)
    return model.eval()


def _vit_mae(**kw) -> MediaCase:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(**kw)
    grid = cfg.image_size // cfg.patch_size
    model = randomise(ViTMAEForPreTraining(cfg), "mask_token", "cls_token")
    inputs = dict(
        pixel_values=torch.randn(3, cfg.num_channels, cfg.image_size, cfg.image_size),
        noise=torch.rand(3, grid * grid),
    )
    return MediaCase(model, inputs)


def _vit_simmim(**kw) -> MediaCase:
    from transformers import ViTConfig, ViTForMaskedImageModeling

    cfg = ViTConfig(**kw, encoder_stride=kw["patch_size"])
    grid = cfg.image_size // cfg.patch_size
    model = randomise(ViTForMaskedImageModeling(cfg), "mask_token")
    masked = torch.rand(3, grid * grid) < 0.5
    masked[:, 0] = True
    inputs = dict(
        pixel_values=torch.randn(3, cfg.num_channels, cfg.image_size, cfg.image_size), bool_masked_pos=masked
    )
    return MediaCase(model, inputs)


def _swin(**kw) -> MediaCase:
    from transformers import SwinConfig, SwinForMaskedImageModeling

    cfg = SwinConfig(**kw)
    cfg.encoder_stride = cfg.patch_size * 2 ** (len(cfg.depths) - 1)
    model = randomise(
        SwinForMaskedImageModeling(cfg), "relative_position_bias_table", "mask_token", "position_embeddings"
    )
    grid = cfg.image_size // cfg.patch_size
    masked = torch.rand(2, grid * grid) < 0.5
    masked[:, 0] = True
    inputs = dict(
        pixel_values=torch.randn(2, cfg.num_channels, cfg.image_size, cfg.image_size), bool_masked_pos=masked
    )
    return MediaCase(model, inputs)


def _conformer(samples: int, **kw) -> MediaCase:
    from transformers import Wav2Vec2ConformerConfig, Wav2Vec2ConformerModel

    cfg = Wav2Vec2ConformerConfig(**kw, num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    model = Wav2Vec2ConformerModel(cfg)
    randomise(model, "pos_bias", "masked_spec_embed")
    with torch.no_grad():  # running statistics away from (0, 1), so that eval-mode BatchNorm is exercised
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0.0, 0.3)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    frames = model._get_feat_extract_output_lengths(samples)
    mask_time = torch.zeros(2, int(frames), dtype=torch.bool)
    mask_time[0, 2:6] = True
    mask_time[1, 1:3] = True
    attention = torch.ones(2, samples, dtype=torch.long)
    attention[1, samples * 2 // 3 :] = 0
    inputs = dict(input_values=torch.randn(2, samples), attention_mask=attention, mask_time_indices=mask_time)
    return MediaCase(model, inputs)


# Shapes vary heads and head widths, channels, activations, mask ratios, normalised pixel loss; Swin
# with windows that need padding and shifting at every stage, and absolute positions; Conformer with
# group and layer norm subsampling, conv biases, padded audio and masked frames.
VISION_CASES: dict[str, Callable[[], MediaCase]] = {
    "vit-mae-32x2": lambda: _vit_mae(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40, image_size=16,
        patch_size=4, decoder_hidden_size=24, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=30, norm_pix_loss=True,
    ),
    "vit-mae-48x3-gray": lambda: _vit_mae(
        hidden_size=48, num_hidden_layers=1, num_attention_heads=3, intermediate_size=64, image_size=24,
        patch_size=6, num_channels=1, decoder_hidden_size=32, decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4, decoder_intermediate_size=40, mask_ratio=0.5, hidden_act="gelu_new",
    ),
    "vit-simmim-32x2": lambda: _vit_simmim(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40, image_size=16,
        patch_size=4,
    ),
    "vit-simmim-48x4-tanh": lambda: _vit_simmim(
        hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=56, image_size=20,
        patch_size=5, hidden_act="gelu_new",
    ),
    "swin-16-w2": lambda: _swin(
        embed_dim=16, depths=[2, 2], num_heads=[2, 4], image_size=32, patch_size=4, window_size=2,
    ),
    "swin-12-w5-padded-abs": lambda: _swin(
        embed_dim=12, depths=[2, 3], num_heads=[3, 2], image_size=48, patch_size=4, window_size=5,
        use_absolute_embeddings=True, hidden_act="gelu_new", mlp_ratio=2.0,
    ),
}  # fmt: skip

SPEECH_CASES: dict[str, Callable[[], MediaCase]] = {
    "conformer-group-swish": lambda: _conformer(
        400, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
        conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), conv_depthwise_kernel_size=3,
        hidden_act="swish",
    ),
    "conformer-layer-bias-gelu": lambda: _conformer(
        530, hidden_size=48, num_hidden_layers=1, num_attention_heads=3, intermediate_size=56,
        conv_dim=(8, 12, 16), conv_kernel=(8, 4, 3), conv_stride=(4, 2, 2), conv_bias=True,
        feat_extract_norm="layer", conv_depthwise_kernel_size=5, layer_norm_eps=1e-6,
    ),
}  # fmt: skip
