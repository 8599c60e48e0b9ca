"""The image and speech families' pieces against hand-computed cases (masking, losses, positions, window
masks, relative shifts, frame masks), and the assembled models' presets, init and checkpointing."""

from __future__ import annotations

import math

import pytest
import torch

import models
from models.build import build_from_config
from models.config import PRESETS, get_config
from models.conformer import relative_positions, relative_shift
from models.swin import relative_position_index, shift_mask
from models.vision import (
    mae_loss,
    patchify,
    random_masking,
    simmim_loss,
    sincos_positions_2d,
    unpatchify,
)
from tests.models.vision_cases import max_rel_err

MEDIA = ("vit_mae", "vit_simmim", "swin", "conformer")
MEDIA_PRESETS = [p for p, (cls, _) in PRESETS.items() if cls.family in MEDIA]
TINY_PRESETS = [p for p in MEDIA_PRESETS if "tiny" in p]


def test_random_masking_keeps_the_lowest_noise() -> None:
    ids_keep, mask, ids_restore = random_masking(torch.tensor([[0.3, 0.1, 0.4, 0.2]]), 2)
    assert ids_keep.tolist() == [[1, 3]]
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert ids_restore.tolist() == [[2, 0, 3, 1]]


def test_mae_loss_by_hand() -> None:
    """One 4x4 gray image, 2x2 patches: only the top-left patch [1, 2, 3, 4] is non-zero; patches 0 and 3 masked."""
    pixels = torch.zeros(1, 1, 4, 4)
    pixels[0, 0, :2, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    predicted, mask = torch.zeros(1, 4, 4), torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # Plain: patch 0's MSE is (1 + 4 + 9 + 16) / 4 = 7.5, patch 3's is 0; mean over the two masked.
    assert mae_loss(predicted, pixels, mask, 2, norm_pix=False).item() == pytest.approx(3.75)
    # Normalised: patch 0 becomes (x - 2.5) / sqrt(5/3) (unbiased variance), mean square (5 / (5/3)) / 4.
    assert mae_loss(predicted, pixels, mask, 2, norm_pix=True).item() == pytest.approx(0.375, rel=1e-5)


def test_simmim_loss_by_hand() -> None:
    """L1 over masked pixels, divided by the masked pixel count and by the channels."""
    pixels = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]], [[-1.0, 0.0], [0.0, 5.0]]]])  # (1, 2, 2, 2)
    masked = torch.tensor([[True, False, False, True]])  # pixels (0, 0) and (1, 1), patch size 1
    loss = simmim_loss(torch.zeros_like(pixels), pixels, masked, 1)
    assert loss.item() == pytest.approx((1 + 0 + 1 + 5) / (2 + 1e-5) / 2)


def test_patchify_layout_and_inverse() -> None:
    pixels = torch.arange(2 * 4 * 4, dtype=torch.float).view(1, 2, 4, 4)
    patches = patchify(pixels, 2)
    # First patch: rows 0-1, columns 0-1, channels last: (c0, c1) of (0, 0), (0, 1), (1, 0), (1, 1).
    assert patches[0, 0].tolist() == [0, 16, 1, 17, 4, 20, 5, 21]
    assert torch.equal(unpatchify(patches, 2, 2), pixels)


def test_sincos_positions_by_hand_and_as_transformers_builds_them() -> None:
    s, c = math.sin(1.0), math.cos(1.0)
    table = sincos_positions_2d(2, 4, cls_token=True)[0]  # dim 4: one frequency, w = 1
    expected = [
        [0, 0, 0, 0],
        [0, 1, 0, 1],
        [s, c, 0, 1],
        [0, 1, s, c],
        [s, c, s, c],
    ]  # [CLS], (0,0), (0,1), ...
    torch.testing.assert_close(table, torch.tensor(expected))
    ours = models.build_model("vit-tiny-mae")
    theirs = models.to_hf(ours)
    assert torch.equal(ours.encoder.positions, theirs.vit.embeddings.position_embeddings)


def test_swin_relative_position_index_by_hand() -> None:
    # Window 2: patches (0,0), (0,1), (1,0), (1,1); index = (dh + 1) * 3 + (dw + 1).
    expected = [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
    assert relative_position_index(2).tolist() == expected


def test_swin_shift_mask_by_hand_and_as_transformers() -> None:
    """4x4 grid, window 2, shift 1: region labels per row [0, 0, 1, 2] x per column [0, 0, 1, 2]."""
    m = -100.0
    mask = shift_mask(4, 2, 1)
    assert mask[0].eq(0).all()  # top-left window: one region
    assert mask[1].tolist() == [[0, m, 0, m], [m, 0, m, 0], [0, m, 0, m], [m, 0, m, 0]]  # labels 1 2 / 1 2
    assert mask[2].tolist() == [[0, 0, m, m], [0, 0, m, m], [m, m, 0, 0], [m, m, 0, 0]]  # labels 3 3 / 6 6
    assert mask[3].tolist() == [[0 if i == j else m for j in range(4)] for i in range(4)]  # four regions
    from transformers import SwinConfig
    from transformers.models.swin.modeling_swin import SwinLayer

    layer = SwinLayer(SwinConfig(window_size=3), dim=8, input_resolution=(9, 9), num_heads=2, shift_size=1)
    assert torch.equal(shift_mask(9, 3, 1), layer.get_attn_mask(9, 9, torch.float32, torch.device("cpu")))


def test_relative_shift_and_positions_by_hand() -> None:
    scores = torch.arange(15.0).view(1, 3, 5)  # columns: relative positions +2, +1, 0, -1, -2
    assert relative_shift(scores).tolist() == [[[2, 3, 4], [6, 7, 8], [10, 11, 12]]]  # (i, j) -> i - j
    s, c = math.sin(1.0), math.cos(1.0)
    torch.testing.assert_close(relative_positions(2, 2), torch.tensor([[s, c], [0.0, 1.0], [-s, c]]))


def test_frame_mask_follows_the_conv_arithmetic() -> None:
    model = models.build_model(
        "conformer-tiny", conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), n_layers=1
    )
    attention = torch.ones(2, 400, dtype=torch.long)
    attention[1, 267:] = 0
    # 400 samples: (400 - 10) // 5 + 1 = 79, (79 - 3) // 2 + 1 = 39 frames; 267: 52, then 25.
    frames = model.frame_mask(attention, model.config.num_frames(400))
    assert frames.shape == (2, 39) and frames.sum(1).tolist() == [39, 25]


@pytest.mark.parametrize("dense", ["eager", "sdpa"])
def test_conformer_position_term_per_tile_equals_the_dense_bias(dense: str) -> None:
    """The chunked kernel builds the relative-position term tile by tile (4-frame tiles over 38 frames, padded
    rows included); outputs, loss and every parameter's gradient equal the dense-bias backends' in fp32."""

    def run(backend: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = models.build_model(
            "conformer-tiny", n_layers=2, vocab_size=16, attention=backend, attention_block=4
        )
        audio = torch.randn(2, 12480, generator=torch.Generator().manual_seed(1))
        samples = torch.ones(2, 12480, dtype=torch.long)
        samples[1, 8000:] = 0  # 24 of 38 frames real
        labels = torch.randint(0, 16, (2, 38), generator=torch.Generator().manual_seed(2))
        masked = torch.zeros(2, 38, dtype=torch.bool)
        masked[:, 3:13] = True
        labels[~masked] = -100
        out = model(audio, samples, mask_time_indices=masked, labels=labels)
        out.loss.backward()
        hidden = model.features(audio, samples)
        return hidden, out.loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    hidden, loss, grads = run("chunked")
    ref_hidden, ref_loss, ref_grads = run(dense)
    assert max_rel_err(hidden, ref_hidden) < 1e-5 and max_rel_err(loss, ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys() and any("attn.pos." in n for n in grads)
    worst = max(grads, key=lambda n: max_rel_err(grads[n], ref_grads[n]))
    assert max_rel_err(grads[worst], ref_grads[worst]) < 1e-5, worst


@pytest.mark.parametrize("backend", ["chunked", "eager"])
def test_conformer_runs_under_bf16_autocast(backend: str) -> None:
    """The learned u, v (fp32) follow q's dtype; before, q + u was promoted to fp32 next to a bf16 k, which the
    chunked kernel refuses. The bf16 loss and the position projection's gradient stay near fp32's."""
    torch.manual_seed(0)
    model = models.build_model("conformer-tiny", n_layers=1, vocab_size=16, attention=backend)
    audio = torch.randn(2, 8000, generator=torch.Generator().manual_seed(1))
    labels = torch.full((2, 24), -100)
    labels[:, 2:8] = 3
    results = []
    for enabled in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = model(audio, mask_time_indices=labels != -100, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), model.blocks[0].attn.pos.weight.grad.clone()))
    (loss32, grad32), (loss16, grad16) = results
    assert abs(loss16 - loss32) < 0.05 * loss32
    assert max_rel_err(grad16, grad32) < 0.1


def test_conformer_loss_is_cross_entropy_over_labelled_frames() -> None:
    torch.manual_seed(0)
    model = models.build_model("conformer-tiny", n_layers=1, num_codebooks=2, vocab_size=16).eval()
    audio = torch.randn(2, 3200)
    frames = model.config.num_frames(3200)
    labels = torch.full((2, frames, 2), -100)
    labels[0, 3], labels[1, 5] = torch.tensor([1, 7]), torch.tensor([15, 0])
    masked = labels[..., 0] != -100
    with torch.no_grad():
        full = model(audio, mask_time_indices=masked).logits  # (B, T, K, V)
        out = model(audio, mask_time_indices=masked, labels=labels)
    assert out.logits.shape == (2, 2, 16)
    expected = torch.nn.functional.cross_entropy(full[masked].reshape(-1, 16), labels[masked].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("preset", MEDIA_PRESETS)
def test_parameter_count_equals_transformers(preset: str) -> None:
    """Same architecture as transformers' (built on the meta device), up to what differs by design: MAE's
    fixed positions are buffers here (frozen parameters there); the Conformer's BEST-RQ head is ours only,
    transformers' never-run positional convolution theirs only."""
    import transformers

    from models.hf import _FAMILIES

    config = get_config(preset)
    spec = _FAMILIES[config.family]
    with torch.device("meta"):
        ours = build_from_config(config, init=False)
        theirs = getattr(transformers, spec.hf_class)(spec.to_hf_config(config))
    expected = theirs.num_parameters()
    if config.family == "vit_mae":
        expected -= ours.encoder.positions.numel() + ours.decoder.positions.numel()
    if config.family == "conformer":
        expected -= sum(p.numel() for p in theirs.encoder.pos_conv_embed.parameters())
        expected += ours.head.weight.numel() + ours.head.bias.numel()
    assert ours.num_parameters() == expected
    assert (
        ours.flops_per_token(64) > 0 and ours.num_parameters(exclude_embeddings=True) < ours.num_parameters()
    )


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_init_is_deterministic_and_finite(preset: str) -> None:
    torch.manual_seed(3)
    a = models.build_model(preset)
    torch.manual_seed(3)
    b = models.build_model(preset)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q) and torch.isfinite(p.float()).all(), name


def _batch(model: models.LanguageModel) -> dict[str, torch.Tensor]:
    cfg = model.config
    if cfg.family == "conformer":
        frames = cfg.num_frames(4000)
        masked = torch.zeros(2, frames, dtype=torch.bool)
        masked[:, 2:6] = True
        labels = torch.randint(0, cfg.vocab_size, (2, frames)).masked_fill(~masked, -100)
        return dict(input_values=torch.randn(2, 4000), mask_time_indices=masked, labels=labels)
    pixels = torch.randn(2, cfg.num_channels, cfg.image_size, cfg.image_size)
    if cfg.family == "vit_mae":
        return dict(pixel_values=pixels, noise=torch.rand(2, cfg.grid_size**2))
    return dict(pixel_values=pixels, bool_masked_pos=torch.rand(2, cfg.grid_size**2) < 0.5)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_gradient_checkpointing_leaves_gradients_unchanged(preset: str) -> None:
    """With dropout (and Swin's stochastic depth) on: the recomputation replays the same random draws."""
    extra = dict(drop_path=0.2) if preset.startswith("swin") else {}
    grads, states = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = models.build_model(preset, dropout=0.1, gradient_checkpointing=checkpointing, **extra).train()
        torch.manual_seed(1)
        inputs = _batch(model)
        torch.manual_seed(2)
        model(**inputs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        states.append(model.state_dict())
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, buf in states[0].items():  # BatchNorm's running statistics moved once, not again in recompute
        torch.testing.assert_close(states[1][name], buf, rtol=1e-5, atol=1e-6, msg=name)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_wrong_shapes_are_errors_naming_them() -> None:
    vit = models.build_model("vit-tiny-mae", n_layers=1, decoder_n_layers=1)
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, C, 32, 32\)"):
        vit(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"noise must be \(B, num_patches\)"):
        vit(torch.randn(1, 3, 32, 32), noise=torch.rand(1, 10))
    with pytest.raises(ValueError, match="smaller than window_size"):
        get_config("swin-tiny-simmim", window_size=8)
    with pytest.raises(ValueError, match="depthwise_kernel=4 must be odd"):
        get_config("conformer-tiny", depthwise_kernel=4)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_conformer_batch_norm_is_torchs_and_computes_in_its_statistics_dtype(momentum: float | None) -> None:
    from models.conformer import RecomputeSafeBatchNorm

    torch.manual_seed(0)
    ours, reference = RecomputeSafeBatchNorm(6, momentum=momentum), torch.nn.BatchNorm1d(6, momentum=momentum)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    reference.load_state_dict(ours.state_dict())
    for step in range(3):  # outputs, running statistics and the batch count as torch's own BatchNorm
        x = torch.randn(4, 6, 9) * (step + 1)
        assert torch.equal(ours(x), reference(x))
    for name, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    ours.eval(), reference.eval()
    x = torch.randn(2, 6, 5)
    assert torch.equal(ours(x), reference(x))
    # Mixed precision (FSDP casts the weights, not the fp32 statistics): fp32 arithmetic, the input's dtype out.
    low = RecomputeSafeBatchNorm(6, momentum=momentum).to(torch.bfloat16).eval()
    low.load_state_dict(ours.state_dict())
    low.running_mean, low.running_var = ours.running_mean.clone(), ours.running_var.clone()
    out = low(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    expected = reference(x.to(torch.bfloat16).float())  # same bf16-rounded weights as `low`
    assert max_rel_err(out.float(), expected) < 1e-2
