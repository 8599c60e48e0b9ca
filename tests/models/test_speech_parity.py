"""The Conformer's encoder equals transformers' Wav2Vec2ConformerModel for the same weights, audio, padding and
masked frames: hidden states and gradients, both conversion directions, and an export AutoModel loads."""

from __future__ import annotations

import pytest
import torch

import models
from models.hf import _FAMILIES, convert_from_hf
from tests.models.vision_cases import BACKENDS, SPEECH_CASES, TOL, MediaCase, max_rel_err


@pytest.fixture(params=list(SPEECH_CASES))
def case(request: pytest.FixtureRequest) -> MediaCase:
    torch.manual_seed(0)
    return SPEECH_CASES[request.param]()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_states_match_transformers(case: MediaCase, backend: str) -> None:
    ours = models.from_hf(case.model, attention=backend).eval()
    with torch.no_grad():
        ref = case.model(**case.inputs).last_hidden_state
        out, frames = ours.encode(**case.inputs)
        plain_ref = case.model(input_values=case.inputs["input_values"]).last_hidden_state
        plain, _ = ours.encode(case.inputs["input_values"])
    assert max_rel_err(out, ref) < TOL
    assert frames is not None and not frames.all()
    assert max_rel_err(plain, plain_ref) < TOL


def test_gradients_match_transformers(case: MediaCase) -> None:
    ours = models.from_hf(case.model, attention="sdpa").eval()
    weights = torch.randn_like(case.model(**case.inputs).last_hidden_state)
    (case.model(**case.inputs).last_hidden_state * weights).sum().backward()
    (ours.encode(**case.inputs)[0] * weights).sum().backward()
    spec = _FAMILIES[ours.config.family]
    hf_grads = {n: p.grad for n, p in case.model.named_parameters() if p.grad is not None}
    rules = [r for r in spec.rules(ours.config) if all(n in hf_grads for n in r.theirs)]
    expected = convert_from_hf(rules, hf_grads)
    for name, param in ours.named_parameters():
        if name.startswith(spec.ours_only):
            assert param.grad is None, name  # the BEST-RQ head is not on the encoder's path
            continue
        assert param.grad is not None, name
        scale = expected[name].abs().max().clamp_min(1e-6)
        err = ((param.grad - expected[name]).abs().max() / scale).item()
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_to_hf_round_trip(case: MediaCase) -> None:
    """to_hf(from_hf(m)) has m's tensors and outputs; the positional convolution transformers builds but never
    runs is the one thing not carried over."""
    back = models.to_hf(models.from_hf(case.model))
    assert type(back) is type(case.model)
    ref_state, back_state = case.model.state_dict(), back.state_dict()
    assert set(back_state) == set(ref_state)
    unused = _FAMILIES["conformer"].unused
    for name, tensor in ref_state.items():
        if not name.startswith(unused):
            assert torch.equal(back_state[name], tensor), name
    with torch.no_grad():
        assert torch.equal(back(**case.inputs).last_hidden_state, case.model(**case.inputs).last_hidden_state)


def test_from_hf_keeps_a_fresh_objective_head(case: MediaCase) -> None:
    ours = models.from_hf(case.model)
    cfg = ours.config
    assert ours.head.weight.shape == (cfg.num_codebooks * cfg.vocab_size, cfg.d_model)
    out = ours(case.inputs["input_values"])
    assert out.logits.shape[-2:] == (cfg.num_codebooks, cfg.vocab_size)


def test_export_loads_in_transformers_auto_model(tmp_path) -> None:
    import transformers

    torch.manual_seed(0)
    model = models.build_model("conformer-tiny", n_layers=2).eval()
    models.to_hf(model).save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "Wav2Vec2ConformerModel"
    audio = torch.randn(2, 16000)
    mask_time = torch.zeros(2, model.config.num_frames(16000), dtype=torch.bool)
    mask_time[:, 10:20] = True
    with torch.no_grad():
        ours, _ = model.encode(audio, mask_time_indices=mask_time)
        ref = loaded(input_values=audio, mask_time_indices=mask_time).last_hidden_state
    assert max_rel_err(ours, ref) < TOL
