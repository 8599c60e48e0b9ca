"""Prepared image and audio shards: decoded once, then the folder's batches, sharding and exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data import DataConfig, DataError, build_media_loader
from data.media import builtin_audio, builtin_image, decode_audio, decode_image, resolve_media_source
from data.media_loader import MediaOptions
from data.media_prepare import MediaSettings, default_short_side, prepare_media_shards, resize_short_side
from data.sources import resolve_source
from tests.data.test_media_data import Image16, Speech

SIDE = default_short_side(16)  # Image16's prepared size: 19


def _prepare(source: Path, out: Path, settings: MediaSettings, held_out: float = 0.2) -> Path:
    cfg = DataConfig(source=str(source), validation_fraction=held_out)
    prepare_media_shards(cfg, out, settings=settings, num_procs=1)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    """24 images already at the prepared size (shorter side 19, either orientation; PNG and lossless WebP
    in two class folders, one gray), and their prepared shards."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    for i in range(24):
        folder = root / "folder" / ("cats" if i % 3 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        array = builtin_image(i, size=SIDE + 8)[0][: SIDE + i % 4, :SIDE]  # tall or square
        array = array.transpose(1, 0, 2).copy() if i % 2 else array  # or wide
        if i == 5:
            array = array[..., 1]
        suffix = ".webp" if i % 4 == 0 else ".png"
        Image.fromarray(array).save(folder / f"{i}{suffix}", lossless=True)
    out = _prepare(root / "folder", root / "prepared", MediaSettings(modality="image", short_side=SIDE))
    return root / "folder", out


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> tuple[Path, Path]:
    """12 mono 16-bit clips at the model's 8 kHz (0.3 to 0.85 s), and their prepared shards."""
    import soundfile

    root = tmp_path_factory.mktemp("clips")
    (root / "folder").mkdir()
    for i in range(12):
        audio = builtin_audio(i, 8000, seconds=0.3 + 0.05 * i)[0]
        soundfile.write(root / "folder" / f"{i}.wav", np.clip(audio, -1, 0.99), 8000, subtype="PCM_16")
    out = _prepare(root / "folder", root / "prepared", MediaSettings(modality="audio", sample_rate=8000))
    return root / "folder", out


def _loader(source: Path, objective: str, model, workers: int = 0, split: str = "train"):
    cfg = DataConfig(
        source=str(source), num_workers=workers, shuffle_buffer=5, prefetch_factor=2, validation_fraction=0.2
    )
    options = MediaOptions(mask_patch_size=8, clip_seconds=0.5, class_labels=True)
    return build_media_loader(
        cfg, objective=objective, model=model, batch_size=3, rank=0, world_size=1, seed=2, options=options,
        split=split,
    )  # fmt: skip


def _take(loader, n: int) -> list[dict[str, np.ndarray]]:
    it = iter(loader)
    return [{k: v.numpy().copy() for k, v in next(it).items()} for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(x[k].tobytes() == y[k].tobytes() for k in x)


@pytest.mark.parametrize(
    ("data", "objective", "model"), [("images", "simmim", Image16()), ("clips", "bestrq", Speech())]
)
def test_prepared_batches_equal_the_folders(request, data: str, objective: str, model) -> None:
    """Records already at the prepared size and rate: the same batches, pixels, masks, targets and labels,
    over more than an epoch, and the same validation pass."""
    folder, prepared = request.getfixturevalue(data)
    for split, n in (("train", 12), ("validation", 1)):
        _same(
            _take(_loader(folder, objective, model, split=split), n),
            _take(_loader(prepared, objective, model, split=split), n),
        )


def test_index_and_stored_arrays(images, tmp_path: Path) -> None:
    import json

    import soundfile

    _, prepared = images
    index = json.loads((prepared / "index.json").read_text())
    assert index["modality"] == "image" and index["settings"] == {
        "channels": 3,
        "short_side": 19,
        "dtype": "uint8",
    }
    counts = {split: index["splits"][split]["records"] for split in ("train", "validation")}
    assert counts["train"] + counts["validation"] == 24 and counts["validation"] > 0
    for split in counts:  # every file counted in both splits, in the folder's order
        per_file = np.load(prepared / f"{split}-files.npy")
        assert index["splits"][split]["files"] == len(per_file) == 24 and per_file.sum() == counts[split]
    # other sizes are resized to the shorter side, gray images get the model's channels
    (tmp_path / "big").mkdir()
    big = builtin_image(3, size=48)[0][:40]  # 40 x 48
    from PIL import Image

    Image.fromarray(big).save(tmp_path / "big" / "a.png")
    Image.fromarray(big[..., 0]).save(tmp_path / "big" / "b.png")
    out = _prepare(tmp_path / "big", tmp_path / "p", MediaSettings(modality="image", short_side=SIDE), 0.0)
    spec = resolve_media_source(
        str(out), "image", split="train", held_out=None, field=None, label_field="label"
    )
    records = [r for _, r in spec.open(stream=0, num_streams=1, seed=0, shuffle=False).documents(0, None)]
    assert [decode_image(r, 3).shape for r in records] == [(19, 23, 3)] * 2  # 48 * 19 / 40 = 22.8
    assert np.array_equal(decode_image(records[0], 3), resize_short_side(big, 19))
    # audio at another rate and in stereo: mixed down and resampled as the folder source decodes it
    soundfile.write(tmp_path / "s.wav", np.stack([builtin_audio(1, 4000)[0] * 0.5] * 2, 1), 4000)
    wav = resolve_media_source(
        str(tmp_path / "s.wav"), "audio", split="train", held_out=None, field=None, label_field="label"
    )
    out = _prepare(tmp_path / "s.wav", tmp_path / "a", MediaSettings(modality="audio", sample_rate=8000), 0.0)
    spec = resolve_media_source(
        str(out), "audio", split="train", held_out=None, field=None, label_field="label"
    )
    (_, stored), (_, decoded) = (
        next(s.open(stream=0, num_streams=1, seed=0, shuffle=False).documents(0, None)) for s in (spec, wav)
    )
    assert (
        stored.payload.dtype == np.int16 and len(stored.payload) == len(decode_audio(decoded, 8000)) == 8000
    )
    assert np.abs(decode_audio(stored, 8000) - decode_audio(decoded, 8000)).max() <= 0.5 / 32768


@pytest.mark.parametrize("streams", [3, 4])
def test_every_record_is_read_by_exactly_one_stream(images, streams: int) -> None:
    """Ranks x workers = streams: each takes the folder's records for that stream, and together all of them."""
    folder, prepared = images
    seen = []
    for s in range(streams):
        specs = [
            resolve_media_source(
                str(p), "image", split="train", held_out=0.2, field=None, label_field="label"
            )
            for p in (folder, prepared)
        ]
        a, b = (
            [r for _, r in spec.open(stream=s, num_streams=streams, seed=9, shuffle=True).documents(1, None)]
            for spec in specs
        )
        assert len(a) == len(b) and all(
            np.array_equal(decode_image(x, 3), decode_image(y, 3)) for x, y in zip(a, b)
        )
        seen += [y.key for y in b]
    assert (
        len(seen)
        == len(set(seen))
        == sum(1 for _ in specs[1].open(stream=0, num_streams=1, seed=9, shuffle=True).documents(1, None))
    )


def test_resume_gives_byte_identical_batches_with_two_workers(images) -> None:
    _, prepared = images
    loader = _loader(prepared, "simmim", Image16(), workers=2)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    expected = [{k: v.numpy().copy() for k, v in next(it).items()} for _ in range(6)]
    resumed = _loader(prepared, "simmim", Image16(), workers=2)
    resumed.load_state_dict(state)
    _same(expected, _take(resumed, 6))
    fresh = _take(_loader(prepared, "simmim", Image16(), workers=2), 6)
    assert any(a[k].tobytes() != b[k].tobytes() for a, b in zip(expected, fresh) for k in a)  # not the start


def test_refusals_name_the_mismatch(images, clips) -> None:
    _, prepared_images = images
    _, prepared_clips = clips
    with pytest.raises(DataError, match=r"prepared at 8000 Hz, the model reads 16000 Hz"):
        _loader(prepared_clips, "bestrq", Speech(sample_rate=16000))
    with pytest.raises(DataError, match=r"prepared with 3 channels, the model reads 1"):
        _loader(prepared_images, "simmim", Image16(num_channels=1))
    with pytest.raises(DataError, match=r"shorter side 19, smaller than the model's 32"):
        _loader(prepared_images, "simmim", Image16(image_size=32))
    with pytest.raises(
        DataError, match=r"holds prepared decoded image shards, but this run's model reads text"
    ):
        resolve_source(str(prepared_images), DataConfig(), "train", held_out=True)
    with pytest.raises(
        DataError, match=r"holds prepared decoded audio shards, but this run's model reads image"
    ):
        _loader(prepared_clips, "simmim", Image16())
    (prepared_clips / "train-files.npy").rename(prepared_clips / "moved.npy")  # a damaged directory
    try:
        with pytest.raises(DataError, match=r"is incomplete \(.*train-files.npy"):
            _take(_loader(prepared_clips, "bestrq", Speech()), 1)
    finally:
        (prepared_clips / "moved.npy").rename(prepared_clips / "train-files.npy")
    with pytest.raises(DataError, match="generated from each record's number"):
        prepare_media_shards(
            DataConfig(),
            prepared_images.parent / "x",
            settings=MediaSettings(modality="image", short_side=19),
            num_procs=1,
        )
