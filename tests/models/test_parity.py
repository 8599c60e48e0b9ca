"""Our models equal transformers' (same weights via from_hf / to_hf) in logits, loss and gradients."""

from __future__ import annotations

import pytest
import torch

import models
from models.hf import _FAMILIES, convert_from_hf
from tests.models.hf_cases import HFCase

TOL = 1e-5  # relative to the largest reference magnitude, fp32


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def our_inputs(case: HFCase) -> dict[str, torch.Tensor]:
    return dict(case.inputs)


def reference_logits(model: models.ModelOutput, case: HFCase) -> torch.Tensor:
    """Ours returns only the masked positions for BERT with labels; select the same rows from HF's."""
    labels = case.inputs["labels"]
    return model.logits[labels != -100] if type(case.model).__name__ == "BertForMaskedLM" else model.logits


def test_logits_and_loss_match_transformers(hf_case: HFCase, backend: str) -> None:
    ours = models.from_hf(hf_case.model, attention=backend).eval()
    with torch.no_grad():
        ref = hf_case.model(**hf_case.inputs)
        out = ours(**hf_case.inputs)
        unlabelled = {k: v for k, v in hf_case.inputs.items() if k != "labels"}
        if "decoder_input_ids" not in unlabelled and type(hf_case.model).__name__.startswith("T5"):
            unlabelled["decoder_input_ids"] = hf_case.model._shift_right(hf_case.inputs["labels"])
        full_ref = hf_case.model(**unlabelled).logits
        full = ours(**unlabelled).logits
    assert max_rel_err(out.logits, reference_logits(ref, hf_case)) < TOL
    assert max_rel_err(full, full_ref) < TOL
    assert torch.isfinite(out.loss) and abs(out.loss.item() - ref.loss.item()) < TOL * ref.loss.item()


def test_gradients_match_transformers(hf_case: HFCase) -> None:
    hf = hf_case.model
    tied = getattr(hf, "lm_head", None) is not None and hf.lm_head.weight is hf.get_input_embeddings().weight
    if tied and not getattr(
        hf.config, "scale_decoder_outputs", True
    ):  # T5 v1.1: make HF's head really untied
        hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone())
    ours = models.from_hf(hf_case.model, attention="sdpa").eval()
    hf_case.model(**hf_case.inputs).loss.backward()
    ours(**hf_case.inputs).loss.backward()
    spec = _FAMILIES[ours.config.family]
    hf_grads = {n: p.grad for n, p in hf_case.model.named_parameters(remove_duplicate=False)}
    expected = convert_from_hf(spec.rules(ours.config), hf_grads)
    for name, param in ours.named_parameters():
        assert param.grad is not None, name
        scale = expected[name].abs().max().clamp_min(1e-6)
        err = ((param.grad - expected[name]).abs().max() / scale).item()
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_to_hf_round_trip(hf_case: HFCase) -> None:
    """to_hf(from_hf(m)) is m again: same class, same tensors, same logits."""
    ours = models.from_hf(hf_case.model)
    back = models.to_hf(ours)
    assert type(back) is type(hf_case.model)
    ref_state = hf_case.model.state_dict()
    back_state = back.state_dict()
    assert set(back_state) == set(ref_state)
    for name, tensor in ref_state.items():
        assert torch.equal(back_state[name], tensor), name
    with torch.no_grad():
        assert torch.equal(back(**hf_case.inputs).logits, hf_case.model(**hf_case.inputs).logits)


@pytest.mark.parametrize("vocab_multiple", [1, 48])
def test_to_hf_from_built_model_matches(vocab_multiple: int) -> None:
    """A model from our presets converts to transformers and computes the same logits; a padded vocabulary
    (64 tokens in 96 rows) converts to transformers' 64 rows."""
    for preset, extra in (
        ("gpt-tiny", {}),
        ("bert-tiny", {}),
        ("t5-tiny", {}),
        ("t5-v1_1-small", dict(n_layers=1, n_heads=2)),
    ):
        torch.manual_seed(0)
        model = models.build_model(
            preset, vocab_size=64, d_model=32, d_ff=48, vocab_multiple=vocab_multiple, **extra
        ).eval()
        assert model.embed.tokens.weight.shape[0] == (96 if vocab_multiple == 48 else 64)
        hf = models.to_hf(model)
        assert hf.config.vocab_size == 64
        ids = torch.randint(0, 64, (2, 9))
        inputs = (
            dict(input_ids=ids, decoder_input_ids=ids[:, :5])
            if model.config.family == "t5"
            else dict(input_ids=ids)
        )
        with torch.no_grad():
            assert max_rel_err(model(**inputs).logits, hf(**inputs).logits) < TOL, preset
        if preset.startswith("t5-v1_1"):
            assert hf.lm_head.weight.data_ptr() != hf.shared.weight.data_ptr()  # v1.1 keeps its own head


def test_to_hf_survives_save_and_from_pretrained(tmp_path) -> None:
    """What `pretrain export` writes loads back in transformers with the same logits (v1.1's untied head too)."""
    import transformers

    for preset in ("gpt-tiny", "bert-tiny", "t5-v1_1-small"):
        torch.manual_seed(0)
        model = models.build_model(preset, vocab_size=64, d_model=32, d_ff=48, n_layers=1, n_heads=2).eval()
        models.to_hf(model).save_pretrained(tmp_path / preset)
        loaded = getattr(transformers, _FAMILIES[model.config.family].hf_class).from_pretrained(
            tmp_path / preset
        )
        ids = torch.randint(0, 64, (2, 7))
        inputs = dict(input_ids=ids)
        if model.config.family == "t5":
            inputs["decoder_input_ids"] = ids[:, :4]
        with torch.no_grad():
            assert max_rel_err(model(**inputs).logits, loaded.eval()(**inputs).logits) < TOL, preset


def test_from_hf_refuses_an_untied_head_it_would_drop() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(
        GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    )
    hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach() + 1)
    with pytest.raises(ValueError, match="lm_head.weight differs from transformer.wte.weight"):
        models.from_hf(hf)


def test_from_hf_rejects_other_classes() -> None:
    from transformers import BertConfig, BertModel

    with pytest.raises(ValueError, match="unsupported model class BertModel; accepted: GPT2LMHeadModel"):
        models.from_hf(
            BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
        )
