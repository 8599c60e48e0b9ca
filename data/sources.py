"""`data.source` strings -> source specs: builtin, file globs, prepared directories, hf:NAME[:CONFIG]."""

from __future__ import annotations

import os
from typing import Any

from data.config import DataConfig, Modality
from data.corpus import builtin_files, stdlib_root
from data.errors import DataError
from data.files import FilesSpec, SourceFile, resolve_files
from data.hub import HFSpec
from data.records import SourceSpec
from data.shards import PREPARED_INDEX, PreparedSpec, load_prepared_index


def resolve_source(
    spec: str, cfg: DataConfig, split: str, *, held_out: bool, setting: str = "data.source"
) -> SourceSpec:
    """Turn a `data.source` string into a spec for `split`.

    held_out: the validation split is carved out of this source (validation_fraction of its records),
    rather than being a separate source. setting: the config key errors name.
    """
    fraction = cfg.validation_fraction if held_out else None
    if spec == "builtin":
        root = stdlib_root()
        files = [
            SourceFile(path=str(p), key=p.relative_to(root).as_posix(), fmt="text", compression=None)
            for p in builtin_files()
        ]
        return FilesSpec(name=spec, files=files, cfg=cfg, split=split, held_out=fraction, unit="file")
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise DataError(f"{setting}: {spec!r} names no dataset; write hf:NAME or hf:NAME:CONFIG")
        hf_split = cfg.hf_split if split == "train" else "validation"
        return HFSpec(name=spec, dataset=name, config=config or None, split=hf_split, field=cfg.text_field)
    if os.path.isdir(os.path.expanduser(spec)) and os.path.exists(
        os.path.join(os.path.expanduser(spec), PREPARED_INDEX)
    ):
        path = os.path.expanduser(spec)
        index = load_prepared_index(path, setting=setting)
        if split not in index["splits"]:
            raise DataError(f"{setting}: prepared {path!r} has no {split!r} split")
        return PreparedSpec(name=spec, path=path, split=split, index=index)
    if os.path.isdir(os.path.expanduser(spec)):
        raise DataError(
            f"{setting}: {spec!r} is a directory without {PREPARED_INDEX}; "
            "give a glob such as 'DIR/*.jsonl' or a directory from `pretrain data prepare`"
        )
    return FilesSpec(
        name=spec,
        files=resolve_files(spec, setting=setting),
        cfg=cfg,
        split=split,
        held_out=fraction,
        unit=cfg.text_unit,
    )


def resolve_any_source(
    spec: str,
    cfg: DataConfig,
    split: str,
    *,
    held_out: bool,
    modality: Modality | None = None,
    setting: str = "data.source",
) -> Any:
    """`resolve_source` for text (`modality=None`), data.media's `resolve_media_source` for images or audio."""
    if modality is None:
        return resolve_source(spec, cfg, split, held_out=held_out, setting=setting)
    from data.media import resolve_media_source

    return resolve_media_source(
        spec,
        modality,
        split=split,
        held_out=cfg.validation_fraction if held_out else None,
        field=cfg.media_field,
        label_field="label",
        hf_split=cfg.hf_split,
        setting=setting,
    )


def source_settings(cfg: DataConfig) -> list[tuple[str, str, str, bool]]:
    """(config key, source, split, held_out) for every source of cfg, train and validation."""
    held_out = cfg.validation_source is None
    out = []
    for i, component in enumerate(cfg.components):
        setting = "data.source" if isinstance(cfg.source, str) else f"data.source[{i}].source"
        out.append((setting, component.source, "train", held_out))
    if cfg.validation_source is not None:
        out.append(("data.validation_source", cfg.validation_source, "validation", False))
    return out


def check_sources(cfg: DataConfig, modality: Modality | None = None) -> None:
    """Resolve every source of cfg (train and validation) without reading any data: text sources, or image or
    audio ones for `modality`.

    Cheap (globs, file sizes, prepared indexes; no network, no torch): a run can call it before it creates
    anything, so a bad path fails in milliseconds with a DataError naming the key and the file.
    """
    for setting, source, split, held_out in source_settings(cfg):
        resolve_any_source(source, cfg, split, held_out=held_out, modality=modality, setting=setting)
