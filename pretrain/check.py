"""`pretrain check`: what would fail later in a run, found now, offline, in seconds, each as one line.

`load_config` has already checked the keys, the source paths, `data.seq_len` against the model's positions,
`model.init_from` (readable, compatible with the given fields), the DeepSpeed JSON and the W&B login. This adds
what needs the files' contents: the tokenizer loads and fits the model's vocabulary, `model.init_from`'s weights
have every tensor the model needs in its shape (file headers only), and the first record of every local source
parses with the configured format and field.

The check never uses the network, as if HF_HUB_OFFLINE=1: a hub tokenizer or an `hf:` dataset must be in the
local Hugging Face cache. When it is not, training would download it, so the check only notes that; with
HF_HUB_OFFLINE=1 set (a node without network, where the run would fail) it is an error.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pretrain.components import TOKENIZER_DIR
from pretrain.config import RunConfig
from pretrain.errors import ConfigError

if TYPE_CHECKING:
    from models import ModelConfig


def check_run(cfg: RunConfig) -> list[str]:
    """Raises ConfigError (one line) for the first problem; returns notes on what needs the network."""
    from data import DataError

    notes: list[str] = []
    try:
        if cfg.modality is not None:
            _check_checkpoint_fits(cfg, cfg.model.config)
            _check_media_records(cfg, notes)
            return notes
        model = _check_tokenizer(cfg, notes)
        if model is not None:
            _check_checkpoint_fits(cfg, model)
        _check_init_weights(cfg)
        _check_records(cfg, notes)
    except DataError as e:
        raise ConfigError(" ".join(str(e).split())) from None
    return notes


def _offline_required() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _not_cached(error: Exception, notes: list[str], what: str) -> None:
    """A hub name missing from the cache: an error where the run has no network, else a note."""
    if _offline_required() or "not usable offline" not in str(error):
        raise error
    notes.append(
        f"{str(error).split(': ', 1)[0]}: {what} will be downloaded at training start (not in the cache)"
    )


def _check_tokenizer(cfg: RunConfig, notes: list[str]) -> ModelConfig | None:
    """The tokenizer the run will use loads and fits the model (a resumed run reuses its saved copy); the model
    config it gives, or None when the tokenizer is trained at start or not in the cache."""
    from data import DataError
    from data.tokenizer import load_tokenizer, with_family_tokens

    saved = cfg.run_dir / TOKENIZER_DIR
    name = str(saved) if (saved / "tokenizer.json").is_file() else cfg.data.tokenizer
    if name is None:
        return None  # trained from the data at start
    try:
        tokenizer = load_tokenizer(name, offline=True)
    except DataError as e:
        _not_cached(e, notes, repr(name))
        return None
    return cfg.model.for_tokenizer(with_family_tokens(tokenizer, cfg.model.family, name))


def _check_checkpoint_fits(cfg: RunConfig, model: ModelConfig) -> None:
    """A resumed run's newest checkpoint has the model's tensors in their shapes (its header only), as the
    restore will check."""
    from pretrain.checkpoint import RESUME_FIX, check_fits, checkpoint_dirs, state_dict_shapes
    from pretrain.components import meta_model

    newest = next(iter(checkpoint_dirs(cfg.run_dir / "checkpoints")), None)
    if newest is not None and (newest / "model.safetensors").is_file():
        check_fits(newest / "model.safetensors", state_dict_shapes(meta_model(model)), fix=RESUME_FIX)


def _check_init_weights(cfg: RunConfig) -> None:
    """`model.init_from`'s tensors fit the model, as the build will read them (a resumed run does not read them)."""
    from pretrain.checkpoint import checkpoint_dirs
    from pretrain.components import meta_model
    from pretrain.init_from import check_weights

    if cfg.model.init_from is not None and not checkpoint_dirs(cfg.run_dir / "checkpoints"):
        check_weights(cfg.model.init_from, meta_model(cfg.model.config))


def _check_records(cfg: RunConfig, notes: list[str]) -> None:
    """The first record of every local file parses; hub datasets are in the local cache."""
    from data import DataError
    from data.files import FilesSpec, check_first_record
    from data.hub import HFSpec, check_cached
    from data.sources import resolve_source

    data = cfg.data
    sources = [("data.source", c.source, "train") for c in data.components]
    if data.validation_source is not None:
        sources.append(("data.validation_source", data.validation_source, "validation"))
    for setting, source, split in sources:
        spec = resolve_source(source, data, split, held_out=False, setting=setting)
        if isinstance(spec, FilesSpec) and source != "builtin":
            check_first_record(spec, setting)
        elif isinstance(spec, HFSpec):
            try:
                check_cached(spec, setting)
            except DataError as e:
                _not_cached(e, notes, repr(source))


def _check_media_records(cfg: RunConfig, notes: list[str]) -> None:
    """Image and speech sources: the first file of every local source decodes (a parquet file has the
    media column); prepared shards fit the model; hub datasets are in the local cache."""
    from data import DataError
    from data.hub import check_cached
    from data.media import (
        HFMediaSpec,
        MediaFilesSpec,
        MediaRecord,
        check_prepared,
        decode_audio,
        decode_image,
    )
    from data.sources import resolve_any_source, source_settings

    modality = cfg.modality
    for setting, source, split, held_out in source_settings(cfg.data):
        spec = resolve_any_source(
            source, cfg.data, split, held_out=held_out, modality=modality, setting=setting
        )
        check_prepared(spec, cfg.model.config, setting=setting)
        if isinstance(spec, MediaFilesSpec):
            first = spec.open(stream=0, num_streams=1, seed=0, shuffle=False).documents(0, None)
            record = next(iter(first), (None, None))[1]
            if not isinstance(record, MediaRecord):
                raise DataError(f"{setting}: {source!r} holds no readable {modality} record")
            try:
                if modality == "image":
                    decode_image(record, 3)
                else:
                    decode_audio(record, cfg.model.config.sample_rate)
            except DataError as e:
                raise DataError(f"{setting}: {e}") from None
        elif isinstance(spec, HFMediaSpec):
            try:
                check_cached(spec, setting, field_key="data.media_field")
            except DataError as e:
                _not_cached(e, notes, repr(source))
