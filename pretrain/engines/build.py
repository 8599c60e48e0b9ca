"""Building the model where its weights will live: whole on every rank, or only this rank's shards.

Building first and sharding later makes every rank hold the whole model once (the classic ZeRO-3 / FSDP
out-of-memory at start-up), so the engine builds the model itself from a `ModelRecipe`:
- ZeRO-3 constructs it inside `deepspeed.zero.Init` (each module's parameters are partitioned as soon as the
  module exists), FSDP on the meta device, then `fully_shard`, then allocates only the local shards;
- DDP and ZeRO 0-2 keep whole replicas and build as before;
- the image and speech families (models/vit.py, swin.py, conformer.py) initialise as their papers do, module
  by module from one seeded generator, with fixed tables as buffers, so they have no per-parameter rules
  (`init_rules`): every rank builds them whole (`init_weights(seed)`: the same weights on every rank), and
  the engine shards them afterwards.
Every other path fills parameters one at a time from `initial_slices`: `models.base.initial_value` (one generator
per parameter name), or the tensor of `model.init_from`'s source, each rank copying its own slice. So the
initial weights are bitwise the same for every engine and world size, and a rank never holds more than its
shards plus the one parameter being filled, also while it loads a source.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.base import LanguageModel, initial_value
from models.build import build_from_config, model_class
from models.config import ModelConfig
from pretrain.config import EngineSpec
from pretrain.engines.dist import DistInfo

if TYPE_CHECKING:
    from pretrain.init_from import SourceWeights


@dataclass(frozen=True, kw_only=True)
class ModelRecipe:
    """How to make the run's model: its config, the seed of its initial weights, the weights to start from
    instead (`model.init_from`, checked against `config`), and whether to compile it."""

    config: ModelConfig
    seed: int
    compile: bool = False
    weights: SourceWeights | None = None  # a resized table's new rows still come from `seed`

    def model_class(self) -> type[LanguageModel]:
        return model_class(self.config.family)

    def builds_sharded(self) -> bool:
        """Whether each parameter can be initialised alone, from its name (`init_rules`), so that a sharded
        engine may build the model on the meta device and fill only its own slices."""
        return self.model_class().init_rules is not LanguageModel.init_rules

    def construct(self) -> LanguageModel:
        """The modules only, under whatever device / partitioning context the caller opened."""
        return self.model_class()(self.config)


def sharded(spec: EngineSpec) -> bool:
    """Whether `spec`'s engine keeps only a shard of the parameters on each rank."""
    return spec.backend == "fsdp" or (spec.deepspeed is not None and spec.deepspeed.zero_stage == 3)


def build_model(spec: EngineSpec, recipe: ModelRecipe, dist: DistInfo) -> nn.Module:
    """The initialised model as `spec`'s engine holds it on this rank (collective for sharded engines)."""
    if spec.backend == "fsdp" and recipe.builds_sharded():
        from pretrain.engines.fsdp import build_sharded

        return build_sharded(spec, recipe, dist)
    if sharded(spec) and recipe.builds_sharded():
        from pretrain.engines.deepspeed import build_partitioned

        return build_partitioned(spec, recipe, dist)
    if recipe.weights is None:  # also the image and speech families, whole: the engine shards them
        model = build_from_config(recipe.config, seed=recipe.seed).to(dist.device)
    else:
        model = _build_whole(recipe, dist)
    if recipe.compile:
        model.compile_blocks()  # compiles lazily, at the first step
    return model


def _build_whole(recipe: ModelRecipe, dist: DistInfo) -> nn.Module:
    """A whole replica filled by `initial_slices` (the language models a source can hold have no buffers)."""
    with torch.device("meta"):
        model = recipe.construct()
    model.to_empty(device=dist.device)
    with torch.no_grad():
        for _, param, full in initial_slices(model, recipe):
            param.copy_(full)
    return model


def initial_slices(
    model: LanguageModel, recipe: ModelRecipe
) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
    """(name, parameter, its whole starting value) one parameter at a time: the recipe's source tensor, or the
    seeded initial value. The caller copies its slice before asking for the next."""
    rules = model.checked_init_rules()
    for name, param in model.named_parameters():
        shape = getattr(param, "ds_shape", None) or param.shape  # a ZeRO-3 parameter's own shape is (0,)
        initial = partial(initial_value, rules[name], name, shape, recipe.seed)
        yield name, param, initial() if recipe.weights is None else recipe.weights.value(name, shape, initial)
