"""`pretrain sample RUN_DIR`: what a checkpoint has learned, read straight from it (no export needed).

Each family is asked what its objective trained it for, greedily so that two checkpoints compare on the same
prompts: GPT continues a prompt; T5 fills the sentinels (`<extra_id_0>` ...) of a corrupted text; BERT lists its
top-k tokens for each mask token. The prompt keeps its end when it is longer than the model's positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from models.base import LanguageModel

DEFAULT_PROMPTS = {
    "gpt": ["def main(", "import os\n"],
    "t5": ["def <extra_id_0>(self):\n    return <extra_id_1>"],
    "bert": ["def main([MASK]):"],
}


@dataclass(frozen=True, kw_only=True)
class Sample:
    prompt: str
    output: str

    def __str__(self) -> str:
        return f"{self.prompt!r} -> {self.output!r}"


def sample_run(
    run_dir: Path,
    prompts: list[str] | None = None,
    *,
    step: int | None = None,
    max_new_tokens: int = 32,
    top_k: int = 5,
) -> tuple[Path, list[Sample]]:
    """The checkpoint read (the newest intact one, or `step`) and one sample per prompt (default: the family's)."""
    from pretrain.errors import ConfigError
    from pretrain.export import load_run_model, read_run_config

    cfg = read_run_config(run_dir)
    if cfg.modality is not None:
        raise ConfigError(
            f"sample: {run_dir} trained {cfg.model.origin}, which reads {cfg.modality} files, not prompts; "
            f"`pretrain export` it for transformers' pipelines"
        )
    model, tokenizer, checkpoint = load_run_model(run_dir, cfg, step=step)
    family = cfg.model.family
    texts = prompts or DEFAULT_PROMPTS[family]
    return checkpoint, [
        Sample(
            prompt=p, output=generate(model, tokenizer, family, p, max_new_tokens=max_new_tokens, top_k=top_k)
        )
        for p in texts
    ]


@torch.no_grad()
def generate(
    model: LanguageModel,
    tokenizer: PreTrainedTokenizerFast,
    family: str,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    top_k: int = 5,
    forward: Callable[..., Any] | None = None,
    device: torch.device | None = None,
) -> str:
    """One prompt's sample as text. `forward` runs the model (default `model`; in training, the engine's wrapper,
    which every rank calls alike so that ZeRO-3 and FSDP gather their shards); `model` gives the config."""
    forward = forward or model
    model.eval()
    if isinstance(forward, torch.nn.Module):
        forward.eval()
    run = _Runner(model, forward, device or torch.device("cpu"))
    if family == "gpt":
        return _continue(run, tokenizer, prompt, max_new_tokens)
    if family == "t5":
        return _fill_sentinels(run, tokenizer, prompt, max_new_tokens)
    return _fill_masks(run, tokenizer, prompt, top_k)


@dataclass(frozen=True)
class _Runner:
    model: LanguageModel
    forward: Callable[..., Any]
    device: torch.device

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Logits on CPU for inputs on CPU."""
        return self.forward(**{k: v.to(self.device) for k, v in inputs.items()}).logits.float().cpu()


def _window(run: _Runner) -> int | None:
    return run.model.config.max_seq_len


def _continue(run: _Runner, tokenizer: PreTrainedTokenizerFast, prompt: str, new: int) -> str:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.bos_token_id]])
    start = ids.shape[1]
    window = _window(run)
    for _ in range(new):
        context = ids if window is None else ids[:, -window:]  # learned positions: keep the end
        token = run(input_ids=context)[:, -1:].argmax(-1)
        ids = torch.cat([ids, token], dim=1)
        if token.item() == tokenizer.eos_token_id:
            break
    return tokenizer.decode(ids[0, start:])


def _fill_sentinels(run: _Runner, tokenizer: PreTrainedTokenizerFast, prompt: str, new: int) -> str:
    if "<extra_id_0>" not in prompt:
        prompt = f"{prompt} <extra_id_0>"
    inputs = tokenizer(prompt, return_tensors="pt")
    if (window := _window(run)) is not None:
        inputs = {k: v[:, -window:] for k, v in inputs.items()}
    decoded = torch.tensor([[run.model.config.decoder_start_token_id]])
    for _ in range(new):
        logits = run(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], decoder_input_ids=decoded
        )
        decoded = torch.cat([decoded, logits[:, -1:].argmax(-1)], dim=1)
        if decoded[0, -1].item() == tokenizer.eos_token_id:
            break
    return tokenizer.decode(decoded[0, 1:], skip_special_tokens=False)


def _fill_masks(run: _Runner, tokenizer: PreTrainedTokenizerFast, prompt: str, top_k: int) -> str:
    mask = tokenizer.mask_token
    if mask not in prompt:
        raise ValueError(f"sample: a BERT prompt needs {mask} where tokens are to be filled, got {prompt!r}")
    inputs = tokenizer(prompt, return_tensors="pt", truncation=True, max_length=_window(run))
    names = ("input_ids", "attention_mask", "token_type_ids")
    probs = run(**{k: v for k, v in inputs.items() if k in names}).softmax(-1)
    where = (inputs["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten().tolist()
    parts = []
    for i, position in enumerate(where):
        top = probs[0, position].topk(top_k)
        options = ", ".join(
            f"{tokenizer.decode([t])!r} {p:.3f}" for t, p in zip(top.indices.tolist(), top.values.tolist())
        )
        parts.append(f"{mask}{i}: {options}")
    return "; ".join(parts)
