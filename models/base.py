"""What all three families have in common beyond their blocks: parameter counts, the FLOPs interface, loss,
and initialisation that does not depend on how (or whether) the parameters are sharded."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.config import ModelConfig


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean token cross-entropy in fp32 over labels != -100 (what transformers computes)."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def key_padding(attention_mask: Tensor | None) -> Tensor | None:
    """The boolean keep-mask for attention, or None when nothing is padded.

    Dropping an all-ones mask keeps SDPA's fused kernels (flash / is_causal) eligible; it costs one
    host sync per forward, not per layer.
    """
    if attention_mask is None:
        return None
    keep = attention_mask.bool()
    return None if bool(keep.all()) else keep


@dataclass(frozen=True)
class SampleShape:
    """What one training sample makes a model compute, as its objective shapes it; FLOPs depend on nothing else.

    input_len: tokens fed to the model (T5: to its encoder). FLOPs are counted per input token, the
        tokens that tokens/s counts.
    target_len: T5's decoder length (span-corruption targets are much shorter than the inputs); None for
        GPT and BERT, which have no decoder.
    predicted_fraction: the share of input positions the LM head runs at. BERT with labels runs its MLM
        head only at the masked positions; every other model and case runs it everywhere (1.0).
    """

    input_len: int
    target_len: int | None = None
    predicted_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.input_len < 1 or (self.target_len is not None and self.target_len < 1):
            raise ValueError(
                f"lengths must be >= 1, got input_len={self.input_len}, target_len={self.target_len}"
            )
        if not 0.0 <= self.predicted_fraction <= 1.0:
            raise ValueError(f"predicted_fraction must be in [0, 1], got {self.predicted_fraction}")


def matmul_flops(weights: int, positions: float) -> float:
    """Training FLOPs of `weights` multiply-adds applied at `positions` positions: 2 per multiply-add
    forward, 4 backward (the gradients of the input and of the weight)."""
    return 6.0 * weights * positions


def attention_flops(layers: int, width: int, queries: float, keys: float) -> float:
    """Training FLOPs of attention's two matmuls (scores q k^T, then probabilities x v) over `width` =
    heads x head width. Masked pairs are not discounted (the usual convention for MFU): causal masks and
    sliding windows cost what the eager kernel computes, the whole score matrix."""
    return 2 * matmul_flops(layers * width, queries * keys)


def self_attention_keys(config: ModelConfig, n: float, *, causal: bool) -> float:
    """Keys each of `n` queries is scored against in self attention, as `config.attention` computes them.

    Exact backends: all n (masked pairs are not discounted, as in `attention_flops`). The approximate ones
    skip work, so their pattern is what counts: sparse, the window band, the global tokens both ways and the
    random blocks (tile rounding ignored); linformer, its k projected keys twice over (projecting keys and
    values along the sequence, k x n per feature each, costs what scoring k keys does); lsh, per hash round a
    sorted chunk against itself and the previous one (hashing and sorting not counted).
    """
    if config.attention == "sparse":
        assert config.attention_window is not None  # the config refuses sparse without one
        band = config.attention_window if causal else 2 * config.attention_window - 1
        block = config.attention_block or 256
        local = min(n, band + config.attention_global + config.attention_random * block)
        return local + config.attention_global * (n - local) / n  # the global queries see every key
    if config.attention == "linformer":
        return 2.0 * config.linformer_k
    if config.attention == "lsh":
        return config.lsh_n_hashes * min(n, 2 * config.lsh_bucket_size)
    return n


def sequence_projection_weights(model: nn.Module) -> int:
    """Linformer's projections along the sequence: weights, but applied per feature, not per position, so
    `self_attention_keys` counts them and `matmul_flops` must not."""
    from models.attention import LinformerSelfAttention

    return sum(
        num_weights(module.proj_k, *([module.proj_v] if module.proj_v is not None else []))
        for module in model.modules()
        if isinstance(module, LinformerSelfAttention)
    )


def num_weights(*modules: nn.Module) -> int:
    """Parameters of `modules`, a parameter they share counted once."""
    params = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in params.values())


# How one parameter is initialised: fills the full (unsharded) tensor in place, drawing only from the generator.
InitFn = Callable[[Tensor, torch.Generator], None]


def normal(std: float) -> InitFn:
    def fill(t: Tensor, g: torch.Generator) -> None:
        t.normal_(0.0, std, generator=g)

    return fill


def constant(value: float) -> InitFn:
    def fill(t: Tensor, g: torch.Generator) -> None:
        t.fill_(value)

    return fill


def row_blocks(blocks: Sequence[tuple[int, InitFn]]) -> InitFn:
    """Consecutive blocks of rows with their own rule (a fused projection whose parts are scaled apart)."""

    def fill(t: Tensor, g: torch.Generator) -> None:
        for part, (_, rule) in zip(t.split([rows for rows, _ in blocks]), blocks, strict=True):
            rule(part, g)

    return fill


def zero_row(rule: InitFn, row: int) -> InitFn:
    """`rule`, then row `row` set to zero (an embedding's padding row)."""

    def fill(t: Tensor, g: torch.Generator) -> None:
        rule(t, g)
        t[row].zero_()

    return fill


def parameter_seed(seed: int, name: str) -> int:
    """The seed of one parameter's generator: a function of the run's seed and the parameter's name only."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_value(rule: InitFn, name: str, shape: Sequence[int], seed: int) -> Tensor:
    """Parameter `name`'s whole initial tensor (fp32, CPU), drawn from its own generator.

    Every rank computes the same tensor whatever it holds of it, so a sharded engine initialises its slice
    with exactly the values an unsharded build has, at any world size: weights depend on (seed, name) only.
    """
    value = torch.empty(tuple(shape), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        rule(value, torch.Generator(device="cpu").manual_seed(parameter_seed(seed, name)))
    return value


def default_rules(model: nn.Module, std: float) -> dict[str, InitFn]:
    """The usual scheme by module type: linear and embedding weights N(0, std) (padding rows zero), biases
    zero, norms unit gain and zero bias."""
    rules: dict[str, InitFn] = {}
    for prefix, module in model.named_modules():
        at = f"{prefix}." if prefix else ""
        if isinstance(module, nn.Linear):
            rules[at + "weight"] = normal(std)
        elif isinstance(module, nn.Embedding):
            pad = module.padding_idx
            rules[at + "weight"] = normal(std) if pad is None else zero_row(normal(std), pad)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
            rules[at + "weight"] = constant(1.0)
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
            rules[at + "bias"] = constant(0.0)
    return rules


def parameter_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name (the first, for a shared one), to give a rule to a parameter in hand."""
    return {id(p): name for name, p in model.named_parameters()}


class LanguageModel(nn.Module):
    """Base class: `config`, initialisation, block listing, parameter counts and FLOPs per token."""

    config: ModelConfig

    def transformer_blocks(self) -> list[nn.Module]:
        """The per-layer blocks, encoder first, for FSDP wrapping and activation checkpointing."""
        raise NotImplementedError

    def init_rules(self) -> dict[str, InitFn]:
        """Parameter name -> how its initial value is drawn (the family's published scheme)."""
        raise NotImplementedError

    def init_weights(self, seed: int | None = None) -> None:
        """Every parameter from its own generator seeded by (seed, its name): the same weights whichever
        engine, world size or construction order is used. `seed=None` draws one from torch's global RNG.
        Parameters on the meta device stay there (a model built only for its shapes and counts)."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        rules = self.checked_init_rules()
        with torch.no_grad():
            for name, param in self.named_parameters():
                if not param.is_meta:
                    param.copy_(initial_value(rules[name], name, param.shape, seed))

    def checked_init_rules(self) -> dict[str, InitFn]:
        """`init_rules()`, refusing a parameter without a rule (it would keep garbage after a meta build)."""
        rules = self.init_rules()
        missing = [name for name, _ in self.named_parameters() if name not in rules]
        if missing:
            raise ValueError(f"{type(self).__name__}.init_rules() has no rule for {', '.join(missing)}")
        return rules

    def compile_blocks(self) -> None:
        """`torch.compile` each transformer block in place (regional compilation).

        The blocks share their code, so one compiled graph serves every layer: compile time is that of
        one block, not of the model. Inside a block the compiler fuses the elementwise work around the
        matmuls (bias + activation, residual + norm), which is where GPUs lose time to memory traffic;
        what it gained on CPU is in bench/NOTES.md. The chunked attention kernel stays eager (two graph
        breaks per block). Checkpointing still wraps each (compiled) block.
        """
        for block in self.transformer_blocks():
            block.compile()

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Input embeddings (tokens, positions, token types): lookups, not matmuls."""
        return self.embed.lookup_parameters()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once); optionally without the input embeddings."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            for p in self.embedding_parameters():
                params.pop(id(p), None)
        return sum(p.numel() for p in params.values())

    def flops_per_token(self, shape: SampleShape) -> float:
        """Training (forward + backward) FLOPs per input token on samples of `shape`, for MFU.

        Counted matmul by matmul (`matmul_flops`, `attention_flops`), each over the positions it runs
        at: the vocabulary projection is a matmul even when tied to the embedding, lookups (token,
        position and relative-bias tables) are not. Biases and norms count as weights (6 FLOPs per
        parameter and position), a rounding error beside the matmuls.
        """
        raise NotImplementedError
