"""ViT (MAE, SimMIM) and Swin (SimMIM) equal transformers' for the same weights, pixels, masks and noise:
outputs, losses and gradients, both conversion directions, and exports that transformers' Auto classes load."""

from __future__ import annotations

import pytest
import torch

import models
from models.hf import _FAMILIES, convert_from_hf
from tests.models.vision_cases import BACKENDS, TOL, VISION_CASES, MediaCase, max_rel_err

AUTO_CLASS = {
    "ViTMAEForPreTraining": "AutoModelForPreTraining",
    "ViTForMaskedImageModeling": "AutoModelForMaskedImageModeling",
    "SwinForMaskedImageModeling": "AutoModelForMaskedImageModeling",
}


@pytest.fixture(params=list(VISION_CASES))
def case(request: pytest.FixtureRequest) -> MediaCase:
    torch.manual_seed(0)
    return VISION_CASES[request.param]()


def theirs_outputs(model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    out = model(**inputs)
    if type(model).__name__ == "ViTMAEForPreTraining":
        return dict(logits=out.logits, loss=out.loss, mask=out.mask)
    return dict(logits=out.reconstruction, loss=out.loss)


def ours_outputs(model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    out = model(**inputs)
    return {
        k: v
        for k, v in dict(logits=out.logits, loss=out.loss, mask=getattr(out, "mask", None)).items()
        if v is not None
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_and_loss_match_transformers(case: MediaCase, backend: str) -> None:
    ours = models.from_hf(case.model, attention=backend).eval()
    with torch.no_grad():
        ref, out = theirs_outputs(case.model, case.inputs), ours_outputs(ours, case.inputs)
    assert max_rel_err(out["logits"], ref["logits"]) < TOL
    assert abs(out["loss"].item() - ref["loss"].item()) < TOL * ref["loss"].item()
    if "mask" in ref:
        assert torch.equal(out["mask"], ref["mask"])


def test_without_a_mask_simmim_reconstructs_and_has_no_loss(case: MediaCase) -> None:
    if "bool_masked_pos" not in case.inputs:
        pytest.skip("MAE always masks")
    ours = models.from_hf(case.model).eval()
    pixels = case.inputs["pixel_values"]
    with torch.no_grad():
        ref, out = case.model(pixel_values=pixels), ours(pixels)
    assert out.loss is None and ref.loss is None
    assert max_rel_err(out.logits, ref.reconstruction) < TOL


def test_gradients_match_transformers(case: MediaCase) -> None:
    ours = models.from_hf(case.model, attention="sdpa").eval()
    case.model(**case.inputs).loss.backward()
    ours(**case.inputs).loss.backward()
    spec = _FAMILIES[ours.config.family]
    hf_grads = {n: p.grad for n, p in case.model.named_parameters() if p.grad is not None}
    rules = [r for r in spec.rules(ours.config) if all(n in hf_grads for n in r.theirs)]
    expected = convert_from_hf(rules, hf_grads)
    for name, param in ours.named_parameters():
        assert param.grad is not None, name
        scale = expected[name].abs().max().clamp_min(1e-6)
        err = ((param.grad - expected[name]).abs().max() / scale).item()
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_to_hf_round_trip(case: MediaCase) -> None:
    """to_hf(from_hf(m)) is m again: same class, same tensors, same outputs."""
    back = models.to_hf(models.from_hf(case.model))
    assert type(back) is type(case.model)
    ref_state, back_state = case.model.state_dict(), back.state_dict()
    assert set(back_state) == set(ref_state)
    for name, tensor in ref_state.items():
        assert torch.equal(back_state[name], tensor), name
    with torch.no_grad():
        ref, again = theirs_outputs(case.model, case.inputs), theirs_outputs(back, case.inputs)
    assert torch.equal(again["logits"], ref["logits"])


TINY = {
    "vit-tiny-mae": dict(n_layers=1, decoder_n_layers=1),
    "vit-tiny-simmim": dict(n_layers=1),
    "swin-tiny-simmim": dict(depths=(1, 1, 2)),
}


def _inputs(model: models.LanguageModel) -> dict[str, torch.Tensor]:
    cfg = model.config
    pixels = torch.randn(2, cfg.num_channels, cfg.image_size, cfg.image_size)
    if cfg.family == "vit_mae":
        return dict(pixel_values=pixels, noise=torch.rand(2, cfg.grid_size**2))
    return dict(pixel_values=pixels, bool_masked_pos=torch.rand(2, cfg.grid_size**2) < 0.6)


@pytest.mark.parametrize("preset", list(TINY))
def test_export_loads_in_transformers_auto_classes(preset: str, tmp_path) -> None:
    """What `pretrain export` writes (to_hf + save_pretrained) reloads through the Auto class and computes the
    same outputs as our model built from the preset."""
    import transformers

    torch.manual_seed(0)
    model = models.build_model(preset, **TINY[preset]).eval()
    hf = models.to_hf(model)
    hf.save_pretrained(tmp_path)
    auto = AUTO_CLASS[_FAMILIES[model.config.family].hf_class]
    loaded = getattr(transformers, auto).from_pretrained(tmp_path).eval()
    assert type(loaded) is type(hf)
    inputs = _inputs(model)
    with torch.no_grad():
        ours, ref = ours_outputs(model, inputs), theirs_outputs(loaded, inputs)
    assert max_rel_err(ours["logits"], ref["logits"]) < TOL
    assert abs(ours["loss"].item() - ref["loss"].item()) < TOL * ref["loss"].item()
