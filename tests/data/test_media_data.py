"""Image and audio data: the builtin sets, folder / parquet sources, sharding, exact resume with several workers,
and the objectives' pieces (crops, SimMIM and span masks, BEST-RQ targets) against hand-computed cases."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from data import DataConfig
from data.media import (
    AUDIO_CLASSES,
    IMAGE_CLASSES,
    MediaRecord,
    builtin_audio,
    builtin_image,
    decode_audio,
    decode_image,
    resolve_media_source,
)
from data.media_loader import MediaOptions, build_media_loader, clip_frames
from data.media_objectives import (
    RandomProjectionQuantizer,
    center_crop,
    mel_filterbank,
    random_resized_crop,
    simmim_mask,
    span_mask,
    spans_to_mask,
    to_pixels,
)


@dataclass(frozen=True)
class Image16:
    """An image model's geometry (what the loader reads from models' configs)."""

    image_size: int = 16
    patch_size: int = 4
    num_channels: int = 3


@dataclass(frozen=True)
class Speech:
    """A speech model's geometry and BEST-RQ settings: 8 kHz, frames every 80 samples, 160 wide."""

    sample_rate: int = 8000
    frame_stride: int = 80
    receptive_field: int = 160
    mask_time_prob: float = 0.2
    mask_time_length: int = 4
    vocab_size: int = 32
    num_codebooks: int = 2
    codebook_dim: int = 8
    n_mels: int = 16
    quantizer_seed: int = 0
    quantizer_norm: str = "bin"

    def num_frames(self, num_samples: int) -> int:
        return max((num_samples - 160) // 80 + 1, 0)


def _keys(spec, streams: int, epoch: int = 0) -> list[list[str]]:
    return [
        [
            rec.key
            for _, rec in spec.open(stream=s, num_streams=streams, seed=3, shuffle=True).documents(
                epoch, None
            )
        ]
        for s in range(streams)
    ]


# --- the builtin sets -----------------------------------------------------------------------------------


def test_builtin_sets_are_pure_functions_of_the_index() -> None:
    image, label = builtin_image(13)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and label == 3
    assert np.array_equal(builtin_image(13)[0], image) and not np.array_equal(builtin_image(23)[0], image)
    audio, label = builtin_audio(27, 8000)
    assert audio.shape == (8000,) and audio.dtype == np.float32 and label == 7
    assert np.array_equal(builtin_audio(27, 8000)[0], audio) and np.abs(audio).max() < 2
    assert len(IMAGE_CLASSES) == len(AUDIO_CLASSES) == 10


def test_every_record_goes_to_exactly_one_stream_and_the_splits_are_disjoint() -> None:
    train = resolve_media_source(
        "builtin", "image", split="train", held_out=0.1, field=None, label_field="label", builtin_size=200
    )
    valid = resolve_media_source(
        "builtin",
        "image",
        split="validation",
        held_out=0.1,
        field=None,
        label_field="label",
        builtin_size=200,
    )
    per_stream = _keys(train, 3)
    flat = [k for keys in per_stream for k in keys]
    assert len(flat) == len(set(flat)) and max(map(len, per_stream)) - min(map(len, per_stream)) <= 1
    held = {k for keys in _keys(valid, 1) for k in keys}
    assert held and not held & set(flat) and len(held) + len(flat) == 200
    assert _keys(train, 1, epoch=1) != [sorted(flat, key=_keys(train, 1)[0].index)]  # reshuffled per epoch


# --- files and parquet ----------------------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """ImageFolder layout: cats/0..4.png, dogs/5..9.png, one gray and one RGBA image among them."""
    root = tmp_path_factory.mktemp("images")
    for i in range(10):
        folder = root / ("cats" if i < 5 else "dogs")
        folder.mkdir(exist_ok=True)
        array = builtin_image(i)[0]
        if i == 3:
            array = array[..., 0]  # gray
        elif i == 7:
            array = np.concatenate([array, np.full((32, 32, 1), 255, np.uint8)], axis=-1)  # RGBA
        (folder / f"{i}.png").write_bytes(_png(array))
    (root / "notes.txt").write_text("not an image")
    return root


def test_image_folder_labels_by_parent_and_decodes_any_mode(image_folder: Path) -> None:
    spec = resolve_media_source(
        str(image_folder), "image", split="train", held_out=None, field=None, label_field="label"
    )
    records = [
        rec
        for keys in [list(spec.open(stream=0, num_streams=1, seed=0, shuffle=False).documents(0, None))]
        for _, rec in keys
    ]
    assert [r.label for r in records] == [0] * 5 + [1] * 5 and len(records) == 10
    first = decode_image(records[0], 3)
    assert np.array_equal(first, builtin_image(0)[0])
    assert decode_image(records[3], 3).shape == (32, 32, 3) and decode_image(records[7], 1).shape == (
        32,
        32,
        1,
    )


def test_parquet_image_column_with_labels_and_row_group_cursor(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [{"bytes": _png(builtin_image(i)[0]), "path": None} for i in range(7)]
    pq.write_table(
        pa.table({"image": images, "label": list(range(7))}), tmp_path / "set.parquet", row_group_size=3
    )
    spec = resolve_media_source(
        str(tmp_path / "*.parquet"), "image", split="train", held_out=None, field=None, label_field="label"
    )
    docs = list(spec.open(stream=0, num_streams=1, seed=0, shuffle=False).documents(0, None))
    assert [rec.label for _, rec in docs] == list(range(7))
    assert np.array_equal(decode_image(docs[4][1], 3), builtin_image(4)[0])
    cursor = docs[3][0]  # resume after 4 rows: only the rest, starting inside the second row group
    again = list(spec.open(stream=0, num_streams=1, seed=0, shuffle=False).documents(0, cursor))
    assert [rec.label for _, rec in again] == [4, 5, 6]


def test_audio_files_decode_to_mono_at_the_models_rate(tmp_path: Path) -> None:
    import soundfile

    tone = np.sin(2 * np.pi * 440 * np.arange(4000) / 4000).astype(np.float32)
    soundfile.write(tmp_path / "a.wav", np.stack([tone, tone], 1), 4000)  # stereo, 4 kHz, 1 s
    soundfile.write(tmp_path / "b.flac", tone, 8000)  # mono, 8 kHz, 0.5 s
    spec = resolve_media_source(
        str(tmp_path), "audio", split="train", held_out=None, field=None, label_field="label"
    )
    records = [rec for _, rec in spec.open(stream=0, num_streams=1, seed=0, shuffle=False).documents(0, None)]
    a, b = (decode_audio(r, 8000) for r in records)
    assert a.dtype == np.float32 and abs(len(a) - 8000) <= 2 and len(b) == 4000
    spectrum = np.abs(np.fft.rfft(a[1000:7000]))
    assert abs(spectrum.argmax() * 8000 / 6000 - 440) < 3  # the tone survived resampling


def test_bad_inputs_are_errors_naming_them(tmp_path: Path) -> None:
    from data.errors import DataError

    (tmp_path / "x.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no image files"):
        resolve_media_source(
            str(tmp_path), "image", split="train", held_out=None, field=None, label_field="label"
        )
    with pytest.raises(DataError, match="cannot decode image broken"):
        decode_image(MediaRecord("broken", b"not a png"), 3)


# --- the objectives' pieces, by hand --------------------------------------------------------------------


def test_crops_by_hand() -> None:
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    assert np.array_equal(center_crop(image, 4), image[:, 1:5])  # the central 4x4, no resampling
    rng = np.random.default_rng(0)
    crop = random_resized_crop(image, 8, (0.5, 1.0), rng)
    assert crop.shape == (8, 8, 3)
    assert np.array_equal(random_resized_crop(image, 8, (0.5, 1.0), np.random.default_rng(0)), crop)
    pixels = to_pixels(np.full((2, 2, 1), 255, np.uint8))
    assert pixels.shape == (1, 2, 2) and np.allclose(pixels, 1.0)  # (1 - 0.5) / 0.5


def test_simmim_mask_masks_whole_cells() -> None:
    mask = simmim_mask(8, 2, 0.6, np.random.default_rng(0)).reshape(8, 8)
    cells = mask.reshape(4, 2, 4, 2).transpose(0, 2, 1, 3).reshape(16, 4)
    assert (cells.all(1) | ~cells.any(1)).all()  # each 2x2 cell fully masked or not at all
    assert cells.all(1).sum() == 10  # ceil(0.6 * 16)


def test_span_masks_by_hand() -> None:
    assert spans_to_mask(np.array([1, 6]), 3, 8).tolist() == [0, 1, 1, 1, 0, 0, 1, 1]
    mask = span_mask(50, 40, 0.2, 4, np.random.default_rng(1))
    # int(0.2 * 40 / 4 + u) is 2 or 3 spans of 4 frames, all inside the 40 unpadded frames.
    assert 4 <= mask.sum() <= 12 and not mask[40:].any()
    assert not span_mask(10, 3, 0.5, 4, np.random.default_rng(0)).any()  # too short for one span


def test_mel_filterbank_and_log_mel_find_a_tone() -> None:
    bank = mel_filterbank(16, 160, 8000)
    assert bank.shape == (16, 81) and np.all(bank.max(1) > 0.5) and np.all(bank >= 0)
    q = RandomProjectionQuantizer.for_model(Speech())
    tone = np.sin(2 * np.pi * 1000 * np.arange(800) / 8000).astype(np.float32)
    feats = q.log_mel(tone, 9)
    centers = (bank * np.linspace(0, 4000, 81)).sum(1) / bank.sum(1)
    assert abs(centers[feats[4].argmax()] - 1000) < 200


def test_quantizer_codes_by_hand() -> None:
    """Two features, codebook of 3 unit vectors: the code is the entry nearest the normalised projection."""
    q = RandomProjectionQuantizer(
        sample_rate=8000, frame_stride=80, window=160, n_mels=2, codebook_dim=2, codebook_size=3
    )
    object.__setattr__(q, "_projection", np.eye(2, dtype=np.float32)[None])
    object.__setattr__(q, "_codebook", np.array([[[1, 0], [0, 1], [-0.6, -0.8]]], dtype=np.float32))
    feats = np.array([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]], dtype=np.float32)  # mean 0 per dim already
    # per-dim std 2.449: normalised rows point along +x, +y and (-1, -1) / sqrt(2) -> entries 0, 1, 2
    assert q.codes(feats, 3)[:, 0].tolist() == [0, 1, 2]


@pytest.mark.parametrize(("norm", "codes"), [("bin", [4, 3, 2]), ("utterance", [0, 3, 2])])
def test_quantizer_norm_per_bin_scales_a_quiet_bin_up(norm: str, codes: list[int]) -> None:
    """Bin 0 carries the signal (+-4), bin 1 only noise (+-0.1). Per bin, both become unit variance and frame 0
    points along (1, 1); over the utterance the noise stays small and frame 0 points along (1, 0)."""
    q = RandomProjectionQuantizer(
        sample_rate=8000, frame_stride=80, window=160, n_mels=2, codebook_dim=2, codebook_size=5, norm=norm
    )
    entries = [[1, 0], [0, 1], [-1, 0], [0, -1], [0.6, 0.8]]
    object.__setattr__(q, "_projection", np.eye(2, dtype=np.float32)[None])
    object.__setattr__(q, "_codebook", np.array([entries], dtype=np.float32))
    feats = np.array([[4.0, 0.1], [0.0, -0.1], [-4.0, 0.0]], dtype=np.float32)
    assert q.codes(feats, 3)[:, 0].tolist() == codes


# --- the loader: shapes, determinism, exact resume --------------------------------------------------------


def _loader(objective: str, model, workers: int, *, split: str = "train", **options):
    cfg = DataConfig(source="builtin", num_workers=workers, shuffle_buffer=16, prefetch_factor=2)
    opts = MediaOptions(builtin_size=120, mask_patch_size=8, clip_seconds=0.5, **options)
    return build_media_loader(
        cfg,
        objective=objective,
        model=model,
        batch_size=4,
        rank=0,
        world_size=1,
        seed=5,
        options=opts,
        split=split,
    )


def _take(loader, n: int) -> list[dict]:
    it, out = iter(loader), []
    for _ in range(n):
        out.append({k: v.numpy().copy() for k, v in next(it).items()})
    return out


@pytest.mark.parametrize(
    ("objective", "model"), [("mae", Image16()), ("simmim", Image16()), ("bestrq", Speech())]
)
def test_batches_have_fixed_shapes(objective: str, model) -> None:
    batch = _take(_loader(objective, model, 0, class_labels=True), 1)[0]
    if objective == "bestrq":
        frames = clip_frames(model, MediaOptions(clip_seconds=0.5))
        assert batch["input_values"].shape == (4, 4000) and batch["labels"].shape == (4, frames, 2)
        assert ((batch["labels"] != -100).all(-1) == batch["mask_time_indices"]).all()
        assert np.allclose(batch["input_values"][:, :4000].std(1), 1.0, atol=1e-3)
    else:
        assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["pixel_values"].dtype == np.float32
        assert (batch["noise"] if objective == "mae" else batch["bool_masked_pos"]).shape == (4, 16)
    assert batch["class_labels"].shape == (4,) and (batch["class_labels"] >= 0).all()


@pytest.mark.slow
@pytest.mark.parametrize(("objective", "model"), [("simmim", Image16()), ("bestrq", Speech())])
def test_resume_gives_byte_identical_batches_with_several_workers(objective: str, model) -> None:
    """Stop after 9 batches (two workers, each past its first 16-record shuffle block), restore: the next 6
    batches are byte-identical to the uninterrupted run's, pixels, masks and targets included."""
    loader = _loader(objective, model, 2)
    it = iter(loader)
    for _ in range(9):
        next(it)
    state = loader.state_dict()
    expected = [{k: v.numpy().copy() for k, v in next(it).items()} for _ in range(6)]
    resumed = _loader(objective, model, 2)
    resumed.load_state_dict(state)
    got = _take(resumed, 6)
    fresh = _take(_loader(objective, model, 2), 6)
    assert any(a[k].tobytes() != b[k].tobytes() for a, b in zip(expected, fresh) for k in a)  # not the start
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].tobytes() == b[key].tobytes(), key


def test_validation_is_deterministic_and_unaugmented() -> None:
    a = _take(_loader("mae", Image16(), 0, split="validation"), 2)
    b = _take(_loader("mae", Image16(), 0, split="validation"), 2)
    assert all(np.array_equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b))


# --- another world size: the text loader's virtual streams, merge_states and plan_resume -----------------


@pytest.fixture(scope="module")
def solid_colours(tmp_path_factory) -> Path:
    """96 solid 8x8 images, image i of red level 2i: any crop of it is that colour, so the red channel of a
    sample's pixels names its record whatever the augmentation."""
    root = tmp_path_factory.mktemp("solid")
    for i in range(96):
        (root / f"{i:02d}.png").write_bytes(_png(np.full((8, 8, 3), (2 * i, 128, 7), np.uint8)))
    return root


def _media_ranks(root: Path, *, world: int, accum: int, states=None) -> list:
    cfg = DataConfig(
        source=str(root), num_workers=2, shuffle_buffer=8, virtual_streams=8, validation_fraction=0.0
    )
    loaders = []
    for rank in range(world):
        loader = build_media_loader(
            cfg,
            objective="simmim",
            model=Image16(image_size=8, patch_size=2),
            batch_size=2,
            rank=rank,
            world_size=world,
            seed=4,
            options=MediaOptions(mask_patch_size=4),
            grad_accum=accum,
        )
        if states is not None:
            loader.load_state_dict(states)
        loaders.append(loader)
    return loaders


def _steps(iterators: list, accum: int, count: int) -> list[dict]:
    """Global micro-batches k = step x B + rank x accum + a, as numpy arrays."""
    return [
        {k: v.numpy().copy() for k, v in next(it).items()}
        for _ in range(count)
        for it in iterators
        for _ in range(accum)
    ]


def _record_ids(batch: dict) -> list[int]:
    """The record behind each sample: red level 2i, normalised with ImageNet's mean and std."""
    red = batch["pixel_values"][:, 0].mean((1, 2)) * 0.229 + 0.485
    return [round(r * 255 / 2) for r in red]


@pytest.mark.slow
@pytest.mark.parametrize(("world", "accum"), [(1, 4), (4, 1)])
def test_media_resume_at_another_world_size_continues_exactly(
    solid_colours: Path, world: int, accum: int
) -> None:
    """2 ranks x 2 accumulation steps x 2 workers save after 3 steps; every rank's state merged, 1 or 4 ranks
    continue with the uninterrupted run's micro-batches byte for byte (pixels and masks: the augmentation
    is seeded by virtual stream and sample number, not by rank or worker), and no record is lost or
    repeated: each virtual stream's records are its own and distinct."""
    from data import merge_states, plan_resume

    loaders = _media_ranks(solid_colours, world=2, accum=2)
    its = [iter(loader) for loader in loaders]
    before = _steps(its, 2, 3)
    states = [loader.state_dict() for loader in loaders]
    after = _steps(its, 2, 4)

    assert plan_resume(states[0], world_size=world, num_workers=2, micro_batch_size=2) == accum
    merged = merge_states(states)
    resumed = _steps(
        [iter(x) for x in _media_ranks(solid_colours, world=world, accum=accum, states=merged)], accum, 4
    )
    assert len(resumed) == len(after) == 16
    for a, b in zip(after, resumed):
        assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)

    per_stream: dict[int, list[int]] = {}
    for k, batch in enumerate(before + resumed):  # micro-batch k is virtual stream k % 8's
        per_stream.setdefault(k % 8, []).extend(_record_ids(batch))
    ids = [i for stream in per_stream.values() for i in stream]
    assert len(ids) == len(set(ids)) == 56 and set(ids) <= set(range(96))  # 28 micro-batches of 2, no repeat
    assert [merged["streams"][str(v)]["batches"] for v in range(8)] == [2, 2, 2, 2, 1, 1, 1, 1]
