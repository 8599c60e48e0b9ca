"""`data.source` strings -> source specs: builtin, file globs, prepared directories, hf:NAME[:CONFIG]."""

from __future__ import annotations

import os

from data.config import DataConfig
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
        index = load_prepared_index(path)
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


def check_sources(cfg: DataConfig) -> None:
    """Resolve every source of cfg (train and validation) without reading any data.

    Cheap (globs, file sizes, prepared indexes; no network, no torch): a run can call it before it creates
    anything, so a bad path fails in milliseconds with a DataError naming the key and the file.
    """
    held_out = cfg.validation_source is None
    for i, component in enumerate(cfg.components):
        setting = "data.source" if isinstance(cfg.source, str) else f"data.source[{i}].source"
        resolve_source(component.source, cfg, "train", held_out=held_out, setting=setting)
    if cfg.validation_source is not None:
        resolve_source(
            cfg.validation_source, cfg, "validation", held_out=False, setting="data.validation_source"
        )
