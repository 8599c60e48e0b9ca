"""Checkpoint safety: refuse code-running pickles, detect damaged checkpoints (secret redaction: redaction.py).

Pickle is a program, not a data format: `torch.load(weights_only=False)` (which DeepSpeed and DCP use for some
of their files) will import and call whatever a file names. Checkpoints travel between people and clusters,
so every pickled file is read *statically* first (opcodes only, via `pickletools`, nothing imported or
called) and refused when it names a global outside a small allow-list of data-only types. The allow-list was
built by running real DeepSpeed ZeRO 0-3 (fp32/bf16, optimizer offload), Accelerate `save_state` and
`torch.distributed.checkpoint` saves through this checker; each entry says why it cannot run code.

A manifest of per-file sizes and SHA-256 digests, written last, tells a complete checkpoint from a
truncated or tampered one before anything is loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import pickle
import pickletools
import re
import tarfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from pretrain.errors import CheckpointError

__all__ = [
    "ALLOWED_GLOBALS",
    "CheckpointError",
    "CorruptCheckpointError",
    "MANIFEST_NAME",
    "UnsafeCheckpointError",
    "check_pickle_file",
    "check_pickles_under",
    "verify_manifest",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"


class _FileError(CheckpointError):
    """A checkpoint file that must not be loaded; `path` names it, `reason` says why. Met by the rank that
    reads the file, so not agreed across ranks."""

    agreed = False

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.reason = reason
        super().__init__(f"{path}: {reason}", path=path)


class UnsafeCheckpointError(_FileError):
    """The file's pickle would import or call something outside the allow-list (it could run code).

    `global_name` is the offending "module.name", or what else made the file uncheckable (`reason` then says it).
    """

    def __init__(self, path: str | os.PathLike[str], global_name: str, *, reason: str | None = None) -> None:
        self.global_name = global_name
        what = (
            reason or f"its pickle imports {global_name!r}, which is not a plain tensor, container or dtype"
        )
        super().__init__(path, f"refusing to load: {what}; loading it could run code (tampered checkpoint?)")


class CorruptCheckpointError(_FileError):
    """The checkpoint is incomplete, truncated or altered since it was written."""


# ---------------------------------------------------------------------------------------------------------
# The allow-list. Exact (module, name) pairs as they appear in the pickle: no prefix matching, so a dotted
# name such as ("torch._utils", "os.system") never matches. Each entry is data-only: calling it (or creating
# it and setting its __dict__) builds a value and cannot import modules, run code or touch files.

_BUILTINS = {
    # Containers/scalars that protocol-2 pickles (torch.save) spell as globals; pure constructors.
    "set",
    "frozenset",
    "slice",
    "complex",
    "bytearray",
}
_TORCH_STORAGES = {
    # The zip format's persistent ids name a typed storage class only to read its dtype.
    f"{kind}Storage"
    for kind in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
    + ("ComplexFloat", "ComplexDouble", "Untyped")
}
_TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        *(("builtins", name) for name in _BUILTINS),
        *(("__builtin__", name) for name in _BUILTINS),  # the same, as protocol 2 writes them
        ("collections", "OrderedDict"),  # state dicts
        ("_codecs", "encode"),  # how protocol 2 stores `bytes` (str -> bytes; codecs are data transforms)
        # torch tensors: each rebuilds a tensor view from a storage + sizes/strides (the same functions
        # torch's own weights_only unpickler allows)
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch._tensor", "_rebuild_from_type_v2"),  # func/new_type are themselves checked globals
        ("torch", "Tensor"),
        ("torch.nn.parameter", "Parameter"),
        ("torch", "Size"),
        ("torch", "device"),
        ("torch.serialization", "_get_layout"),  # a dict lookup of torch.strided & co by name
        *(("torch", name) for name in _TORCH_STORAGES),
        ("torch.storage", "UntypedStorage"),
        *(("torch", name) for name in _TORCH_DTYPES),
        # numpy arrays/scalars (Accelerate's random_states_*.pkl holds numpy's RNG state); numpy 1.x spells
        # the module numpy.core, 2.x numpy._core. Object arrays keep their items in the pickle (checked too).
        *(
            (mod, name)
            for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
            for name in ("_reconstruct", "scalar")
        ),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # torch.distributed.checkpoint's .metadata: dataclasses describing tensor chunks, one Enum for the
        # memory format, and the checkpoint path. Plain field holders.
        *(
            ("torch.distributed.checkpoint.metadata", name)
            for name in (
                "Metadata",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "TensorProperties",
                "MetadataIndex",
                "StorageMeta",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id; PosixPath(str) only builds a path
        ("pathlib._local", "PosixPath"),  # the same class as Python >= 3.13 names it
        # DeepSpeed ZeRO optimizer states (seen in stage 1-3 fp32/bf16 saves here):
        # - LossScaler: a plain object with `cur_scale`/`dynamic`; no __setstate__/__reduce__, so loading
        #   only sets its __dict__.
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        # - DynamicLossScaler: what fp16 runs save in the same slot (fp16 cannot run on this CPU, so it was
        #   checked by pickling an instance): the same base class, extra int/float/dtype fields only.
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        # - ZeroStageEnum(int, Enum): rebuilt by value lookup.
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        # - fragment_address: a two-int dataclass (numel, start) in ZeRO 1/2 partition maps.
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    }
)

_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
# opcode -> how deep below the top of the stack its callable/class sits
_CALL_DEPTH = {"REDUCE": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3}
_MARK = object()  # a MARK on the simulated stack
_VALUE = object()  # any value we do not need to know


class _Global(str):
    """A stack value that came from an (allowed) global."""


def _scan_pickle(stream: BinaryIO, where: str) -> None:
    """Walk one pickle's opcodes (up to STOP), refusing any global outside ALLOWED_GLOBALS.

    A small stack simulation (as `pickletools.dis` does) resolves STACK_GLOBAL's two string operands and
    checks that everything called (REDUCE/NEWOBJ/OBJ) is an allowed global, not some computed value.
    """
    stack: list[Any] = []
    memo: dict[int, Any] = {}

    def allow(module: str, name: str) -> _Global:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafeCheckpointError(where, f"{module}.{name}")
        return _Global(f"{module}.{name}")

    try:
        for opcode, arg, _pos in pickletools.genops(stream):
            op = opcode.name
            if op.startswith("EXT"):
                raise UnsafeCheckpointError(where, op, reason=f"its pickle imports copyreg extension {arg}")
            before, after = opcode.stack_before, list(opcode.stack_after)
            pushed: list[Any] = [_VALUE] * len(after)
            if op in ("GLOBAL", "INST"):
                module, name = arg.split(" ", 1)
                pushed = [allow(module, name)]
            elif op == "STACK_GLOBAL":
                module, name = stack[-2], stack[-1]
                if not (type(module) is str and type(name) is str):
                    raise UnsafeCheckpointError(
                        where, op, reason="its pickle imports a global whose name is computed at load time"
                    )
                pushed = [allow(module, name)]
            elif op in _STRING_OPS:
                pushed = [arg if isinstance(arg, str) else _VALUE]
            elif op in _GET_OPS:
                pushed = [memo.get(arg, _VALUE)]
            elif op == "DUP":
                pushed = [stack[-1], stack[-1]]
            elif op in _CALL_DEPTH and not isinstance(stack[-_CALL_DEPTH[op]], _Global):
                raise UnsafeCheckpointError(
                    where, op, reason=f"its pickle calls ({op}) a value that is not an allowed global"
                )
            elif op == "OBJ":
                mark = len(stack) - 1 - stack[::-1].index(_MARK)
                if not isinstance(stack[mark + 1], _Global):
                    raise UnsafeCheckpointError(
                        where, op, reason="its pickle calls (OBJ) a value that is not an allowed global"
                    )
            elif op in _PUT_OPS:
                memo[len(memo) if op == "MEMOIZE" else arg] = stack[-1]
                pushed = [stack[-1]] * len(after)  # MEMOIZE pops and pushes back the same object

            popped = len(before)
            if pickletools.markobject in before or (op == "POP" and stack and stack[-1] is _MARK):
                mark = len(stack) - 1 - stack[::-1].index(_MARK)
                del stack[mark:]
                popped = before.index(pickletools.markobject) if pickletools.markobject in before else 0
            if popped:
                if popped > len(stack):
                    raise IndexError("stack underflow")
                del stack[-popped:]
            stack.extend(_MARK if obj is pickletools.markobject else val for obj, val in zip(after, pushed))
    except (IndexError, ValueError) as err:  # ValueError: genops on bad bytes; IndexError: no MARK/underflow
        raise CorruptCheckpointError(where, f"not a readable pickle ({err})") from None


class _FileSlice(io.RawIOBase):
    """A read-only, seekable window [start, start + length) of a file, so zipfile can open part of it."""

    def __init__(self, buf: mmap.mmap, start: int, length: int) -> None:
        self._buf, self._start, self._len, self._pos = buf, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = max(0, {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence] + offset)
        return self._pos

    def readinto(self, out: Any) -> int:
        end = min(self._len, self._pos + len(out))
        n = max(0, end - self._pos)
        out[:n] = self._buf[self._start + self._pos : self._start + self._pos + n]
        self._pos += n
        return n


def _scan_zip(window: _FileSlice, where: str) -> None:
    """Check every `*.pkl` member (torch's `<archive>/data.pkl`) of one zip archive."""
    with zipfile.ZipFile(window) as archive:
        for info in archive.infolist():
            if info.filename.endswith(".pkl"):
                _scan_pickle(io.BytesIO(archive.read(info)), f"{where}:{info.filename}")


def _zip_archive_ends(buf: mmap.mmap) -> Iterator[int]:
    """End offsets of every zip archive in the file (DCP's .distcp files are many torch.save zips in a row)."""
    pos = buf.find(b"PK\x05\x06")
    while pos != -1:
        if pos + 22 <= len(buf):
            yield pos + 22 + int.from_bytes(buf[pos + 20 : pos + 22], "little")
        pos = buf.find(b"PK\x05\x06", pos + 1)


def check_pickle_file(path: str | os.PathLike[str]) -> None:
    """Refuse `path` unless every pickle in it (raw, or inside torch zip archives) names only allowed globals.

    Reads opcodes only; nothing in the file is imported or called.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(path, "empty file")
    if tarfile.is_tarfile(path):  # torch.load tries tar (its legacy format) before anything else
        raise UnsafeCheckpointError(
            path, "tar", reason="it is a tar archive (torch's legacy format, not checked)"
        )
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] == b"PK\x03\x04":  # torch.load treats exactly these as zip checkpoints
            scanned = 0
            for end in _zip_archive_ends(buf):
                try:
                    _scan_zip(_FileSlice(buf, 0, min(end, len(buf))), str(path))
                    scanned += 1
                except (zipfile.BadZipFile, EOFError):
                    if end >= len(buf):  # the archive torch reads is broken; earlier hits are tensor bytes
                        raise CorruptCheckpointError(path, "damaged zip archive") from None
            if scanned == 0:
                raise CorruptCheckpointError(path, "damaged zip archive (no end record)")
            return
        # Raw pickle(s). Python reads one; torch's legacy loader reads several in a row, so every pickle up
        # to the end of the file must parse and pass (legacy files with raw tensor bytes are refused).
        stream = io.BytesIO(buf)
        while stream.tell() < len(buf):
            _scan_pickle(stream, str(path))


_DATA_SUFFIXES = {
    ".safetensors",
    ".json",
    ".jsonl",
    ".txt",
    ".yaml",
    ".yml",
    ".md",
    ".py",
    ".csv",
    ".png",
    ".model",
}


def _is_dcp_metadata(path: Path) -> bool:
    return path.name == ".metadata" or re.fullmatch(r"__\d+\.metadata", path.name) is not None


class _AllowListUnpickler(pickle.Unpickler):
    """Loads a pickle that already passed `_scan_pickle`; find_class re-checks as a second line of defence."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed here")


def _check_dcp_items(metadata_path: Path) -> None:
    """Check exactly the byte ranges torch.distributed.checkpoint will torch.load (some with weights_only=False)."""
    check_pickle_file(metadata_path)
    with open(metadata_path, "rb") as f:
        metadata = _AllowListUnpickler(f).load()
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        where = f"{metadata_path.parent / info.relative_path}@{info.offset}"
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(
                where,
                "transform",
                reason=f"a DCP item stored with transforms {info.transform_descriptors} is not checked",
            )
        with (
            open(metadata_path.parent / info.relative_path, "rb") as f,
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf,
        ):
            try:
                _scan_zip(_FileSlice(buf, info.offset, info.length), where)
            except zipfile.BadZipFile:
                raise CorruptCheckpointError(where, "damaged DCP item") from None


def check_pickles_under(directory: str | os.PathLike[str]) -> list[Path]:
    """Check every possibly-pickled file under `directory` (recursively); return the files checked.

    Files with data-only suffixes (safetensors, JSON, text) are skipped: nothing unpickles them.
    """
    checked = []
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        if path.suffix in _DATA_SUFFIXES or path.name == "latest":
            continue
        if _is_dcp_metadata(path):
            _check_dcp_items(path)
        else:
            check_pickle_file(path)
        checked.append(path)
    return checked


# ---------------------------------------------------------------------------------------------------------
# Manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.name not in (MANIFEST_NAME, f".{MANIFEST_NAME}.tmp")
    )


def write_manifest(directory: str | os.PathLike[str]) -> Path:
    """Record size + SHA-256 of every file under `directory`; call it LAST, after everything else is written.

    Written to a temporary name and renamed, so a manifest exists only for a complete checkpoint.
    """
    directory = Path(directory)
    files = {
        rel: {"size": (directory / rel).stat().st_size, "sha256": _sha256(directory / rel)}
        for rel in _files(directory)
    }
    tmp, final = directory / f".{MANIFEST_NAME}.tmp", directory / MANIFEST_NAME
    with open(tmp, "w") as f:
        json.dump({"version": 1, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def verify_manifest(directory: str | os.PathLike[str]) -> None:
    """Raise CorruptCheckpointError naming the first missing, resized, altered or unlisted file.

    A directory without a manifest is an incomplete checkpoint (the save never finished).
    """
    directory = Path(directory)
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        raise CorruptCheckpointError(
            manifest, "missing: the checkpoint is incomplete (its save never finished)"
        )
    try:
        files: Mapping[str, Mapping[str, Any]] = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(manifest, f"unreadable manifest ({err})") from None
    for rel, entry in sorted(files.items()):
        path = directory / rel
        if not path.is_file():
            raise CorruptCheckpointError(path, "missing (listed in the manifest)")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CorruptCheckpointError(
                path, f"size {size} bytes, manifest says {entry['size']} (truncated?)"
            )
        if _sha256(path) != entry["sha256"]:
            raise CorruptCheckpointError(path, "content differs from the manifest's SHA-256 (altered)")
    extra = sorted(set(_files(directory)) - set(files))
    if extra:
        raise CorruptCheckpointError(
            directory / extra[0], "not listed in the manifest (added after the save)"
        )
