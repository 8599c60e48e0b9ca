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


def resolve_source(spec: str, cfg: DataConfig, split: str, *, held_out: bool) -> SourceSpec:
    """Turn a `data.source` string into a spec for `split`.

    held_out: the validation split is carved out of this source (validation_fraction of its records),
    rather than being a separate source.
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
            raise DataError(f"data.source: {spec!r} names no dataset; write hf:NAME or hf:NAME:CONFIG")
        hf_split = cfg.hf_split if split == "train" else "validation"
        return HFSpec(name=spec, dataset=name, config=config or None, split=hf_split, field=cfg.text_field)
    if os.path.isdir(os.path.expanduser(spec)) and os.path.exists(
        os.path.join(os.path.expanduser(spec), PREPARED_INDEX)
    ):
        path = os.path.expanduser(spec)
        index = load_prepared_index(path)
        if split not in index["splits"]:
            raise DataError(f"data.source: prepared {path!r} has no {split!r} split")
        return PreparedSpec(name=spec, path=path, split=split, index=index)
    if os.path.isdir(os.path.expanduser(spec)):
        raise DataError(
            f"data.source: {spec!r} is a directory without {PREPARED_INDEX}; "
            "give a glob such as 'DIR/*.jsonl' or a directory from `pretrain data prepare`"
        )
    return FilesSpec(
        name=spec, files=resolve_files(spec), cfg=cfg, split=split, held_out=fraction, unit=cfg.text_unit
    )
