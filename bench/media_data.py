"""Image and audio pipeline speed per loader worker: images/s and seconds of audio/s that `build_media_loader`
delivers (decode, augment or crop, mask, BEST-RQ targets, collate), for the builtin sets and for a folder of
files, and for those folders decoded once by `pretrain data prepare` (data/media_prepare.py), with 1 and 2
worker processes.

A worker is one process: with W workers the loader delivers about W times one worker's rate while there are
cores for them, so the per-worker rate says how many workers a GPU's consumption needs. The folder sources are
written here first: 256x256 JPEG images (already at the size ImageNet loaders crop 224 from), 500x375 JPEG
images (the size of many ImageNet photos: decoding takes about as long as the crop) and 2 s stereo 44.1 kHz
WAV clips (read, mixed down, resampled to 16 kHz); their prepared rows read the same records as stored
arrays (images 256 on the shorter side; audio int16 at 16 kHz), so only the crop, mask and targets are left. Run with one thread per process:

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.media_data             # ~1-2 minutes on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.media_data --seconds 3 --files 200
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._common import print_table
from data import DataConfig, build_media_loader
from data.media import builtin_audio, builtin_image
from data.media_loader import media_options
from models.config import get_config

# (name, objective, model preset, what one sample is worth: "images" or seconds of audio)
CASES = [
    ("builtin images 32x32 -> vit-tiny-mae", "mae", "vit-tiny-mae", "builtin"),
    ("folder of 256x256 JPEG -> vit-base-mae (224)", "mae", "vit-base-mae", "images"),
    ("  the same, prepared (uint8 256x256)", "mae", "vit-base-mae", "prepared images"),
    ("folder of 500x375 JPEG -> vit-base-mae (224)", "mae", "vit-base-mae", "photos"),
    ("  the same, prepared (uint8 341x256)", "mae", "vit-base-mae", "prepared photos"),
    ("builtin images 32x32 -> swin-tiny-simmim", "simmim", "swin-tiny-simmim", "builtin"),
    ("builtin clips 1 s -> conformer-tiny", "bestrq", "conformer-tiny", "builtin"),
    ("folder of 2 s 44.1 kHz stereo WAV -> conformer-tiny", "bestrq", "conformer-tiny", "audio"),
    ("  the same, prepared (int16 16 kHz mono)", "bestrq", "conformer-tiny", "prepared audio"),
]


def write_images(root: Path, count: int, size: tuple[int, int] = (256, 256)) -> Path:
    """`count` builtin images upscaled to `size` (width, height) JPEGs, in 10 class folders."""
    from PIL import Image

    top = root / f"images-{size[0]}x{size[1]}"
    for i in range(count):
        image, label = builtin_image(i)
        folder = top / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize(size, Image.Resampling.BICUBIC).save(folder / f"{i}.jpg", quality=90)
    return top


def write_audio(root: Path, count: int) -> Path:
    """`count` 2 s stereo clips at 44.1 kHz (two builtin clips per file, one per channel)."""
    import soundfile

    folder = root / "audio"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        left = np.concatenate([builtin_audio(2 * i, 44100)[0], builtin_audio(2 * i + 1, 44100)[0]])
        soundfile.write(folder / f"{i}.wav", np.stack([left, left[::-1]], axis=1), 44100)
    return folder


def prepare(folder: str, preset: str, out: Path) -> tuple[str, float]:
    """`pretrain data prepare` of a folder for `preset` in one process: the directory and records/s."""
    from data.media_prepare import MediaSettings, default_short_side, prepare_media_shards

    model = get_config(preset)
    if hasattr(model, "sample_rate"):
        settings = MediaSettings(modality="audio", sample_rate=model.sample_rate)
    else:
        settings = MediaSettings(modality="image", short_side=default_short_side(model.image_size))
    summary = prepare_media_shards(DataConfig(source=folder), out, settings=settings, num_procs=1)
    return str(out), summary["records_per_s"]


def rate(source: str, objective: str, preset: str, workers: int, args: argparse.Namespace) -> float:
    """Samples per second delivered after the first batch (worker start-up excluded)."""
    cfg = DataConfig(source=source, num_workers=workers, clip_seconds=2.0 if source != "builtin" else 1.0)
    model = get_config(preset)
    options = media_options(cfg, objective, model)
    loader = build_media_loader(
        cfg, objective=objective, model=model, batch_size=args.batch_size, rank=0, world_size=1, seed=0,
        options=options,
    )  # fmt: skip
    batches = iter(loader)
    next(batches)
    samples, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        batch = next(batches)
        samples += len(next(iter(batch.values())))
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="measured per cell")
    parser.add_argument("--files", type=int, default=400, help="files written per folder source")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        sources = {
            "builtin": "builtin",
            "images": str(write_images(Path(scratch), args.files)),
            "photos": str(write_images(Path(scratch), args.files, (500, 375))),
            "audio": str(write_audio(Path(scratch), args.files)),
        }
        prepared = {
            f"prepared {kind}": prepare(sources[kind], preset, Path(scratch, f"prepared-{kind}"))
            for kind, preset in (
                ("images", "vit-base-mae"),
                ("photos", "vit-base-mae"),
                ("audio", "conformer-tiny"),
            )
        }
        sources.update({kind: path for kind, (path, _) in prepared.items()})
        rows = []
        for name, objective, preset, kind in CASES:
            seconds = 0.0 if objective != "bestrq" else (1.0 if kind == "builtin" else 2.0)
            cells = []
            for workers in (1, 2):
                per_worker = rate(sources[kind], objective, preset, workers, args) / workers
                cells.append(f"{per_worker:,.0f}" if not seconds else f"{per_worker * seconds:,.1f}")
            unit = "images/s" if not seconds else "audio s/s"
            rows.append([name, unit, *cells])
    print_table(["source -> model", "unit (per worker)", "1 worker", "2 workers"], rows)
    for kind, (_, per_s) in prepared.items():
        print(f"`data prepare` of the {kind.split()[1]} folder, one process: {per_s:,.0f} records/s, once")


if __name__ == "__main__":
    main()
