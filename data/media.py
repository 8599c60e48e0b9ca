"""Image and audio samples: sources (builtin sets, a folder or glob of files, parquet, hf:), decoding, and the
procedurally generated builtin sets.

Media sources follow text's `Source` protocol (data/records.py) and go through the same `DocStream`
(epochs, seeded block shuffle, cursors) and sharding rule: the epoch's records are numbered g = 0, 1, ...
in the seeded file order and stream s of S owns those with g % S == s. A record is a `MediaRecord`: a
key, an encoded payload (bytes), a file path or a builtin index, and a class label; it is decoded only
when its batch is made, so a shuffle block holds at most 32 MB of encoded payload (DocStream's bound).

Images decode with Pillow, audio with soundfile (wav, flac, ogg, mp3) and is resampled with soxr. A
directory from `pretrain data prepare` (data/media_prepare.py) holds them decoded once: its records carry
the array (a view of a memory map), which decoding passes through.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from data.errors import DataError
from data.files import in_validation
from data.records import Cursor, SkipLog, epoch_order
from data.shards import PREPARED_INDEX, load_prepared_index

Modality = Literal["image", "audio"]
SUFFIXES: dict[str, tuple[str, ...]] = {
    "image": (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"),
    "audio": (".wav", ".flac", ".ogg", ".mp3"),
}
BUILTIN_IMAGE_SIZE = 32
BUILTIN_AUDIO_SECONDS = 1.0
IMAGE_CLASSES = (
    "disc", "square", "triangle", "cross", "ring", "h-stripes", "v-stripes", "checker", "diagonal", "dots",
)  # fmt: skip
AUDIO_CLASSES = tuple(
    f"{wave}-{contour}"
    for wave in ("sine", "square", "saw", "pulses", "noise")
    for contour in ("rising", "falling")
)


@dataclass(frozen=True)
class MediaRecord:
    """One sample before decoding. payload: encoded bytes, a file path (str), a builtin index (int), or the
    decoded array of a prepared shard (a memory-map view: nothing is read until the sample is made).
    label: the class (a folder name's index, a label column, the builtin class), -1 when unknown."""

    key: str
    payload: bytes | str | int | np.ndarray
    label: int = -1

    def __len__(self) -> int:
        """Bytes held in memory (DocStream bounds a shuffle block's total; a prepared array is a view of a
        memory map, so it holds none)."""
        return len(self.payload) if isinstance(self.payload, bytes) else 1


# --- the builtin sets ---------------------------------------------------------------------------------


def builtin_image(index: int, size: int = BUILTIN_IMAGE_SIZE) -> tuple[np.ndarray, int]:
    """Image `index` of the builtin set, (size, size, 3) uint8, and its class (index % 10, IMAGE_CLASSES):
    a shape or texture of random colour, place and scale on a random noisy background. Pure function of
    index: no file, no download, identical on every machine."""
    rng = np.random.default_rng([0x1A6E, index])
    label = index % len(IMAGE_CLASSES)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    r = rng.uniform(0.18, 0.32) * size
    dx, dy = x - cx, y - cy
    inside = (np.abs(dx) < r) & (np.abs(dy) < r)
    period, phase = rng.uniform(0.12, 0.25) * size, rng.uniform(0, 2 * np.pi)
    wave = 2 * np.pi / period
    shapes = {
        "disc": dx**2 + dy**2 < r**2,
        "square": inside,
        "triangle": (dy > -r) & (dy < r) & (np.abs(dx) < (dy + r) / 2),
        "cross": ((np.abs(dx) < r / 3) & (np.abs(dy) < r)) | ((np.abs(dy) < r / 3) & (np.abs(dx) < r)),
        "ring": (dx**2 + dy**2 < r**2) & (dx**2 + dy**2 > (r / 2) ** 2),
        "h-stripes": inside & (np.sin(wave * y + phase) > 0),
        "v-stripes": inside & (np.sin(wave * x + phase) > 0),
        "checker": inside & (np.sin(wave * x + phase) * np.sin(wave * y + phase) > 0),
        "diagonal": inside & (np.sin(wave * (x + y) / np.sqrt(2) + phase) > 0),
        "dots": inside & (np.sin(wave * x + phase) > 0.5) & (np.sin(wave * y + phase) > 0.5),
    }
    shape = shapes[IMAGE_CLASSES[label]][..., None]
    background, colour = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    while np.abs(colour - background).sum() < 0.9:  # keep the shape visible
        colour = rng.uniform(0, 1, 3)
    image = np.where(shape, colour, background) + rng.normal(0, rng.uniform(0.02, 0.1), (size, size, 3))
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), label


def builtin_audio(
    index: int, sample_rate: int, seconds: float = BUILTIN_AUDIO_SECONDS
) -> tuple[np.ndarray, int]:
    """Clip `index` of the builtin set, float32 mono, and its class (index % 10, AUDIO_CLASSES): a sine,
    square, sawtooth, pulse train or band of noise whose pitch rises or falls, with a random pitch range,
    envelope and gain over background noise."""
    rng = np.random.default_rng([0xA0D1, index])
    label = index % len(AUDIO_CLASSES)
    wave, rising = label // 2, label % 2 == 0
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    f0 = rng.uniform(150, 500)
    f1 = f0 * rng.uniform(1.6, 2.5)
    freq = np.linspace(f0, f1, n) if rising else np.linspace(f1, f0, n)
    phase = 2 * np.pi * np.cumsum(freq) / sample_rate + rng.uniform(0, 2 * np.pi)
    if wave == 0:
        signal = np.sin(phase)
    elif wave == 1:
        signal = np.sign(np.sin(phase))
    elif wave == 2:
        signal = 2 * ((phase / (2 * np.pi)) % 1.0) - 1
    elif wave == 3:
        signal = ((phase / (2 * np.pi)) % 1.0 < 0.1).astype(np.float64) * 2 - 0.2
    else:  # noise through a resonator that follows the pitch contour
        signal = np.sin(phase) * rng.normal(0, 1, n)
    attack, release = rng.uniform(0.01, 0.15, 2)
    envelope = np.minimum(1.0, np.minimum(t / attack, (t[-1] - t) / release + 1e-3))
    audio = signal * envelope * rng.uniform(0.3, 0.9) + rng.normal(0, rng.uniform(0.005, 0.05), n)
    return audio.astype(np.float32), label


class _StreamSource:
    """What every media source keeps: its spec, which of how many streams it feeds, the epoch shuffle's seed
    and switch, and the records it skipped."""

    def __init__(self, spec: Any, *, stream: int, num_streams: int, seed: int, shuffle: bool) -> None:
        self.spec, self.stream, self.num_streams = spec, stream, num_streams
        self.seed, self.shuffle = seed, shuffle
        self.skips = SkipLog()


class BuiltinSource(_StreamSource):
    """The builtin set's records in the epoch's seeded order, this stream's share only."""

    spec: BuiltinSpec

    def documents(self, epoch: int, cursor: Cursor | None) -> Iterator[tuple[Cursor, MediaRecord]]:
        spec = self.spec
        order = epoch_order(spec.size, seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        c = cursor or {"i": 0, "g": 0}
        g = c["g"]
        for i in range(c["i"], spec.size):
            index = int(order[i])
            if spec.held_out is not None and in_validation(spec.name, index, spec.held_out) != (
                spec.split == "validation"
            ):
                continue
            g += 1
            if (g - 1) % self.num_streams == self.stream:
                label = index % len(IMAGE_CLASSES if spec.modality == "image" else AUDIO_CLASSES)
                yield {"i": i + 1, "g": g}, MediaRecord(f"builtin:{index}", index, label)


@dataclass(frozen=True)
class BuiltinSpec:
    name: str
    modality: Modality
    split: str
    held_out: float | None
    size: int

    def open(self, *, stream: int, num_streams: int, seed: int, shuffle: bool) -> BuiltinSource:
        return BuiltinSource(self, stream=stream, num_streams=num_streams, seed=seed, shuffle=shuffle)


# --- files: a folder or glob of images / audio, or parquet with a media column --------------------------


@dataclass(frozen=True)
class MediaFile:
    path: str
    key: str  # relative to the common root: the train/validation split hashes it
    label: (
        int  # the parent folder's index among all parent folders (ImageFolder's convention), -1 for parquet
    )
    parquet: bool


def resolve_media_files(pattern: str, modality: Modality, *, setting: str = "data.source") -> list[MediaFile]:
    """A directory (searched recursively) or a glob -> its media and parquet files, sorted."""
    import glob

    expanded = os.path.expanduser(pattern)
    if os.path.isdir(expanded):
        expanded = os.path.join(expanded, "**", "*")
    suffixes = SUFFIXES[modality] + (".parquet",)
    paths = sorted(
        p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p) and p.lower().endswith(suffixes)
    )
    if not paths:
        raise DataError(f"{setting}: {pattern!r} holds no {modality} files; accepted: {' '.join(suffixes)}")
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    parents = sorted({os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths})
    return [
        MediaFile(
            path=p,
            key=os.path.relpath(os.path.abspath(p), root),
            label=-1
            if p.endswith(".parquet")
            else parents.index(os.path.basename(os.path.dirname(os.path.abspath(p)))),
            parquet=p.lower().endswith(".parquet"),
        )
        for p in paths
    ]


def _payload(value: Any) -> bytes | str | None:
    """An encoded image/audio as stored in parquet or a datasets column: bytes, or {"bytes", "path"}."""
    if isinstance(value, bytes | str):
        return value
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    return None


class MediaFileSource(_StreamSource):
    """Records from media files (one each) and parquet files (one per row); every stream walks the files in
    the epoch's order and keeps the records it owns. Cursor: file, record within it, records numbered."""

    spec: MediaFilesSpec

    def _wanted(self, key: str, record: int) -> bool:
        held_out = self.spec.held_out
        return held_out is None or in_validation(key, record, held_out) == (self.spec.split == "validation")

    def documents(self, epoch: int, cursor: Cursor | None) -> Iterator[tuple[Cursor, MediaRecord]]:
        files = self.spec.files
        order = epoch_order(len(files), seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        c = cursor or {"file": 0, "rec": 0, "g": 0}
        rec, g = c["rec"], c["g"]
        for fi in range(c["file"], len(order)):
            f = files[order[fi]]
            if f.parquet:
                rows = _parquet_rows(f, self.spec.field, self.spec.label_field, rec)
            else:
                rows = iter([(f.path, f.label)] if rec == 0 else [])  # one record per media file
            for value, label in rows:
                record, rec = rec, rec + 1
                if not self._wanted(f.key, record):
                    continue
                g += 1
                if (g - 1) % self.num_streams != self.stream:
                    continue
                payload = _payload(value)
                if payload is None:
                    self.skips.add("missing_field", f.path, record)
                    continue
                yield {"file": fi, "rec": rec, "g": g}, MediaRecord(f"{f.key}#{record}", payload, label)
            rec = 0


def _parquet_rows(f: MediaFile, field: str, label_field: str, start: int) -> Iterator[tuple[Any, int]]:
    """(media value, label) for the rows from `start` on, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f.path)
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"{f.path}: no column {field!r} (columns: {', '.join(names)}); set the media field")
    columns = [field] + ([label_field] if label_field in names else [])
    first = 0
    for group in range(pf.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        if first + rows > start:
            table = pf.read_row_group(group, columns=columns)
            values = table.column(0).to_pylist()
            labels = table.column(1).to_pylist() if len(columns) == 2 else [-1] * rows
            for i in range(max(start - first, 0), rows):
                yield values[i], int(labels[i]) if labels[i] is not None else -1
        first += rows


@dataclass(frozen=True)
class MediaFilesSpec:
    name: str
    files: list[MediaFile]
    split: str
    held_out: float | None
    field: str
    label_field: str

    def open(self, *, stream: int, num_streams: int, seed: int, shuffle: bool) -> MediaFileSource:
        return MediaFileSource(self, stream=stream, num_streams=num_streams, seed=seed, shuffle=shuffle)


# --- hf: a streamed datasets dataset with an image / audio column ----------------------------------------


class HFMediaSource(_StreamSource):
    """A streamed dataset, sharded by `split_dataset_by_node`; its own state is the cursor (as for text).
    The media column is read undecoded (bytes or path), so decoding happens in our workers, seeded."""

    def __init__(self, spec: HFMediaSpec, *, stream: int, num_streams: int, seed: int, shuffle: bool) -> None:
        super().__init__(spec, stream=stream, num_streams=num_streams, seed=seed, shuffle=shuffle)
        self._dataset = None

    def documents(self, epoch: int, cursor: Cursor | None) -> Iterator[tuple[Cursor, MediaRecord]]:
        import datasets
        from datasets.distributed import split_dataset_by_node

        if self._dataset is None:
            ds = self.spec.load()
            feature = ds.features.get(self.spec.field) if ds.features else None
            if isinstance(feature, datasets.Image | datasets.Audio):
                ds = ds.cast_column(self.spec.field, type(feature)(decode=False))
            self._dataset = ds
        ds = split_dataset_by_node(self._dataset, rank=self.stream, world_size=self.num_streams)
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed, buffer_size=1)
            ds.set_epoch(epoch)
        if cursor is not None:
            ds.load_state_dict(cursor["hf"])
        index = cursor["n"] if cursor else 0
        for example in ds:
            index += 1
            payload = _payload(example.get(self.spec.field))
            if payload is None:
                self.skips.add("missing_field", self.spec.name, index - 1)
                continue
            label = example.get(self.spec.label_field)
            label = int(label) if isinstance(label, int) else -1
            yield (
                {"hf": ds.state_dict(), "n": index},
                MediaRecord(f"{self.spec.name}#{index - 1}", payload, label),
            )


@dataclass(frozen=True)
class HFMediaSpec:
    name: str
    dataset: str
    config: str | None
    split: str
    field: str
    label_field: str

    def load(self) -> Any:
        import datasets

        try:
            return datasets.load_dataset(self.dataset, self.config, split=self.split, streaming=True)
        except Exception as exc:  # the hub and loaders raise many types; one clear line is what helps
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise DataError(
                f"data.source: cannot load {self.name!r} split {self.split!r}: {type(exc).__name__}: {first}"
            ) from None

    def open(self, *, stream: int, num_streams: int, seed: int, shuffle: bool) -> HFMediaSource:
        return HFMediaSource(self, stream=stream, num_streams=num_streams, seed=seed, shuffle=shuffle)


# --- prepared: arrays decoded once by `pretrain data prepare` (data/media_prepare.py) ---------------------


class PreparedMediaSource(_StreamSource):
    """Decoded shards, read at random. Records are numbered as the folder they came from numbers them (its
    files in the epoch's seeded order, each file's records in turn) and stream s of S takes those with
    g % S == s, so a run on the shards sees the folder's records in the folder's order."""

    def __init__(
        self, spec: PreparedMediaSpec, *, stream: int, num_streams: int, seed: int, shuffle: bool
    ) -> None:
        super().__init__(spec, stream=stream, num_streams=num_streams, seed=seed, shuffle=shuffle)
        self.image = spec.index["modality"] == "image"
        try:
            self._open(spec.index["splits"][spec.split])
        except (OSError, ValueError) as exc:
            raise DataError(
                f"data.source: {spec.name!r} is incomplete ({exc}); prepare it again into an empty directory"
            ) from None

    def _open(self, split: dict[str, Any]) -> None:
        path = self.spec.path
        self.file_records = np.load(os.path.join(path, f"{self.spec.split}-files.npy"))
        self.file_start = np.concatenate([[0], np.cumsum(self.file_records)])
        dtype = np.uint8 if self.image else np.int16
        self.shards, starts = [], [0]
        for shard in split["shards"]:
            base = os.path.join(path, shard["name"])
            values = np.memmap(f"{base}.bin", dtype, mode="r") if shard["values"] else np.zeros(0, dtype)
            offsets = np.load(f"{base}.idx.npy", mmap_mode="r")
            labels = np.load(f"{base}.labels.npy", mmap_mode="r")
            shapes = np.load(f"{base}.shapes.npy", mmap_mode="r") if self.image else None
            self.shards.append((values, offsets, labels, shapes))
            starts.append(starts[-1] + shard["records"])
        self.shard_start = np.array(starts, dtype=np.int64)

    def record(self, index: int) -> MediaRecord:
        shard = int(np.searchsorted(self.shard_start, index, side="right")) - 1
        values, offsets, labels, shapes = self.shards[shard]
        local = index - int(self.shard_start[shard])
        array = values[offsets[local] : offsets[local + 1]]
        if shapes is not None:
            array = array.reshape(*shapes[local], -1)
        return MediaRecord(f"{self.spec.name}#{index}", array, int(labels[local]))

    def documents(self, epoch: int, cursor: Cursor | None) -> Iterator[tuple[Cursor, MediaRecord]]:
        order = epoch_order(len(self.file_records), seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        epoch_start = np.concatenate([[0], np.cumsum(self.file_records[order])])
        S, start = self.num_streams, cursor["g"] if cursor else 0
        for g in range(start + (self.stream - start) % S, int(epoch_start[-1]), S):
            fi = (
                int(np.searchsorted(epoch_start, g, side="right")) - 1
            )  # files with no record are passed over
            yield {"g": g + 1}, self.record(int(self.file_start[order[fi]]) + g - int(epoch_start[fi]))


@dataclass(frozen=True)
class PreparedMediaSpec:
    name: str
    path: str
    split: str
    index: dict[str, Any]

    def open(self, *, stream: int, num_streams: int, seed: int, shuffle: bool) -> PreparedMediaSource:
        return PreparedMediaSource(self, stream=stream, num_streams=num_streams, seed=seed, shuffle=shuffle)


def check_prepared(spec: Any, model: Any, *, setting: str = "data.source") -> None:
    """Prepared shards must fit the model they feed: its channels and no smaller than its image, or its
    sample rate (anything else is a source that decodes as it goes)."""
    if not isinstance(spec, PreparedMediaSpec):
        return
    settings, again = spec.index["settings"], "prepare them again with this run's config"
    if spec.index["modality"] == "audio":
        if settings["sample_rate"] != model.sample_rate:
            raise DataError(
                f"{setting}: {spec.name!r} was prepared at {settings['sample_rate']} Hz, the model reads "
                f"{model.sample_rate} Hz; {again}"
            )
        return
    if settings["channels"] != model.num_channels:
        raise DataError(
            f"{setting}: {spec.name!r} was prepared with {settings['channels']} channels, the model reads "
            f"{model.num_channels}; {again}"
        )
    if settings["short_side"] < model.image_size:
        raise DataError(
            f"{setting}: {spec.name!r} holds images of shorter side {settings['short_side']}, smaller than "
            f"the model's {model.image_size}; {again}"
        )


def resolve_media_source(
    spec: str,
    modality: Modality,
    *,
    split: str,
    held_out: float | None,
    field: str | None,
    label_field: str,
    hf_split: str = "train",
    builtin_size: int = 20_000,
    setting: str = "data.source",
) -> BuiltinSpec | MediaFilesSpec | HFMediaSpec | PreparedMediaSpec:
    """`builtin`, `hf:NAME[:CONFIG]`, a prepared directory, or a directory / glob of media or parquet
    files -> a source spec."""
    field = field or modality
    if spec == "builtin":
        return BuiltinSpec(
            name=f"builtin-{modality}", modality=modality, split=split, held_out=held_out, size=builtin_size
        )
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise DataError(f"{setting}: {spec!r} names no dataset; write hf:NAME or hf:NAME:CONFIG")
        return HFMediaSpec(
            name=spec,
            dataset=name,
            config=config or None,
            split=hf_split if split == "train" else "validation",
            field=field,
            label_field=label_field,
        )
    path = os.path.expanduser(spec)
    if os.path.isfile(os.path.join(path, PREPARED_INDEX)):
        index = load_prepared_index(path, modality, setting=setting)
        if split not in index["splits"]:
            raise DataError(f"{setting}: prepared {path!r} has no {split!r} split")
        return PreparedMediaSpec(name=spec, path=path, split=split, index=index)
    files = resolve_media_files(spec, modality, setting=setting)
    return MediaFilesSpec(
        name=spec, files=files, split=split, held_out=held_out, field=field, label_field=label_field
    )


# --- decoding -------------------------------------------------------------------------------------------


def decode_image(record: MediaRecord, channels: int) -> np.ndarray:
    """(H, W, channels) uint8."""
    if isinstance(record.payload, np.ndarray):  # prepared: decoded with the channels check_prepared checked
        return np.asarray(record.payload)
    if isinstance(record.payload, int):
        image, _ = builtin_image(record.payload)
        return image if channels == 3 else image.mean(-1, keepdims=True).round().astype(np.uint8)
    from PIL import Image

    try:
        source = io.BytesIO(record.payload) if isinstance(record.payload, bytes) else record.payload
        with Image.open(source) as img:
            array = np.asarray(img.convert("RGB" if channels == 3 else "L"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot decode image {record.key}: {exc}") from None
    return array if array.ndim == 3 else array[..., None]


def decode_audio(record: MediaRecord, sample_rate: int) -> np.ndarray:
    """Mono float32 at `sample_rate` (channels averaged, resampled with soxr when the file's rate differs)."""
    if isinstance(record.payload, np.ndarray):  # prepared: int16 at the rate check_prepared checked
        return record.payload.astype(np.float32) / 32768  # as soundfile reads 16-bit PCM: exactly
    if isinstance(record.payload, int):
        return builtin_audio(record.payload, sample_rate)[0]
    import soundfile

    try:
        source = io.BytesIO(record.payload) if isinstance(record.payload, bytes) else record.payload
        audio, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except (OSError, RuntimeError, ValueError) as exc:  # soundfile raises LibsndfileError (a RuntimeError)
        raise DataError(f"cannot decode audio {record.key}: {exc}") from None
    audio = audio.mean(axis=1)
    if rate != sample_rate:
        import soxr

        audio = soxr.resample(audio, rate, sample_rate).astype(np.float32)
    return audio
