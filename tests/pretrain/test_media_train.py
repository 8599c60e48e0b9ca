"""Image and speech presets through the real CLI under torchrun (2 processes, gloo): each family trains on
ZeRO-2 and on FSDP with gradient checkpointing to the same losses, a sharded run resumes bit for bit, and
`pretrain export` writes what transformers' Auto classes and processors load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.export import export
from pretrain.logging import read_metrics, read_resumes
from tests.common import REPO
from tests.pretrain.test_train_e2e import subprocess_env

pytestmark = pytest.mark.slow

STEPS = 4
# Cut down to seconds per 2-process run on 2 CPU cores; dropout on, so the RNG state must resume too.
FAMILIES = {
    "vit_mae": ("configs/vit-tiny-mae.yaml", ["model.n_layers=2", "model.decoder_n_layers=1"]),
    "swin": ("configs/swin-tiny-simmim.yaml", ["model.depths=[1,1,2]", "model.drop_path=0.1"]),
    "conformer": (
        "configs/conformer-tiny.yaml",
        ["model.n_layers=2", "model.conv_dim=[32,32,32,32,32,32,32]"],
    ),
}
COMMON = [
    f"train.max_steps={STEPS}",
    "train.micro_batch_size=4",
    "train.grad_accum=2",
    "train.warmup_steps=1",
    "train.eval_every=2",
    "train.eval_batches=1",
    "model.dropout=0.1",
    "log.every=1",
    "checkpoint.every=2",
    "checkpoint.keep=3",
    "wandb.mode=disabled",
]
ENGINES = {
    "zero2": ["engine.backend=deepspeed", "engine.deepspeed.zero_stage=2"],
    "fsdp": ["engine.backend=fsdp", "model.gradient_checkpointing=true"],
}
UNITS = {"vit_mae": 64, "swin": 256, "conformer": 49}  # patches per image, frames per 1 s clip
_runs: dict[tuple[str, str], Path] = {}


def torchrun(family: str, engine: str, run_dir: Path, *extra: str) -> str:
    """`pretrain train` on 2 processes; what it wrote to stderr."""
    config, shrink = FAMILIES[family]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [
        "-m",
        "pretrain",
        "train",
        config,
        *shrink,
        *COMMON,
        *ENGINES[engine],
        f"run.dir={run_dir}",
        *extra,
    ]
    env = subprocess_env() | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def run(family: str, engine: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-process run, shared by the tests."""
    if (family, engine) not in _runs:
        run_dir = tmp_path_factory.mktemp(f"{family}-{engine}") / "straight"
        workers = (
            ["data.num_workers=1"] if (family, engine) == ("vit_mae", "fsdp") else []
        )  # loader workers too
        torchrun(family, engine, run_dir, *workers)
        _runs[family, engine] = run_dir
    return _runs[family, engine]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_trains_on_two_processes_with_zero2_and_fsdp_alike(
    family: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    zero2 = read_metrics(run(family, "zero2", tmp_path_factory))
    fsdp = read_metrics(run(family, "fsdp", tmp_path_factory))
    assert [r["step"] for r in zero2] == [r["step"] for r in fsdp] == list(range(1, STEPS + 1))
    per_step = 2 * 2 * 4 * UNITS[family]  # world x grad_accum x micro-batch x patches (frames) per sample
    for a, b in zip(zero2, fsdp, strict=True):
        assert a["tokens"] == b["tokens"] == a["step"] * per_step
        assert a["tokens_per_s"] > 0 and 0 < a["mfu"] < 1
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (
            a["step"],
            a["loss"],
            b["loss"],
        )  # same data, init
    assert zero2[1]["val_loss"] == pytest.approx(fsdp[1]["val_loss"], abs=1e-5)
    assert len({r["loss"] for r in zero2}) == STEPS  # real numbers, not a constant


@pytest.mark.parametrize("family", ["vit_mae", "conformer"])
def test_a_sharded_media_run_resumes_exactly(family: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """FSDP, 2 processes, dropout, checkpointing (ViT: one loader worker each; Conformer: BatchNorm's running
    statistics, which the validation loss reads): resumed from step 2 == uninterrupted, bit for bit."""
    straight = run(family, "fsdp", tmp_path_factory)
    resumed = straight.parent / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS}")
    (resumed / "checkpoints" / "latest").write_text("step_2")
    notes = torchrun(family, "fsdp", resumed, *(["data.num_workers=1"] if family == "vit_mae" else []))
    assert "resuming at step 2" in notes and read_resumes(resumed) == [2]
    a = {r["step"]: r for r in read_metrics(straight)}
    b = {r["step"]: r for r in read_metrics(resumed)}
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in ("loss", "lr", "grad_norm", "tokens", "val_loss"):
            assert a[step].get(key) == b[step].get(key), (step, key)
    wa = load_file(str(straight / "checkpoints" / f"step_{STEPS}" / "model.safetensors"))
    wb = load_file(str(resumed / "checkpoints" / f"step_{STEPS}" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


PROCESSOR = {
    "vit_mae": "AutoImageProcessor",
    "swin": "AutoImageProcessor",
    "conformer": "AutoFeatureExtractor",
}
HF_CLASS = {
    "vit_mae": "ViTMAEForPreTraining",
    "swin": "SwinForMaskedImageModeling",
    "conformer": "Wav2Vec2ConformerModel",
}
AUTO = {
    "vit_mae": "AutoModelForPreTraining",
    "swin": "AutoModelForMaskedImageModeling",
    "conformer": "AutoModel",
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_in_auto_classes_with_its_processor(
    family: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import transformers

    straight = run(family, "zero2", tmp_path_factory)
    out = straight.parent / "hf"
    result = export(straight, out, step=2)
    assert (result.step, result.family) == (2, family) and result.max_logit_diff < 1e-4
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    model = getattr(transformers, AUTO[family]).from_pretrained(out)
    assert type(model).__name__ == HF_CLASS[family]
    processor = getattr(transformers, PROCESSOR[family]).from_pretrained(out)
    saved = json.loads((out / "preprocessor_config.json").read_text())
    if family == "conformer":
        assert processor.sampling_rate == 16000 and saved["do_normalize"] is True
        values = processor([torch.randn(8000).numpy()], sampling_rate=16000, return_tensors="pt")[
            "input_values"
        ]
        assert model(input_values=values).last_hidden_state.shape == (1, 24, model.config.hidden_size)
    else:
        assert processor.size == {"height": 32, "width": 32}
        assert processor.image_mean == pytest.approx([0.485, 0.456, 0.406])
        assert processor.image_std == pytest.approx([0.229, 0.224, 0.225])
        image = (torch.rand(48, 40, 3) * 255).to(torch.uint8).numpy()
        assert processor(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)


def test_sample_refuses_a_media_run_in_one_line(
    tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from pretrain.cli import main

    straight = run("swin", "zero2", tmp_path_factory)
    assert main(["sample", str(straight)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'swin-tiny-simmim', which reads image files, not prompts" in err, err


@pytest.mark.parametrize(
    ("family", "engine"),
    [("vit_mae", "deepspeed"), ("conformer", "deepspeed"), ("conformer", "ddp"), ("conformer", "fsdp")],
)
def test_bf16_runs_with_float_buffers_and_inputs(family: str, engine: str, tmp_path: Path) -> None:
    """bf16: DeepSpeed casts only the parameters (the engine casts pixels, waveforms and float buffers: MAE's
    positions, BatchNorm's statistics), DDP autocasts (the Conformer's relative-position biases follow q), FSDP
    casts the parameters but not BatchNorm's fp32 statistics (the Conformer's BatchNorm computes in fp32)."""
    import math

    config, shrink = FAMILIES[family]
    args = [config, *shrink, *COMMON, "train.max_steps=2", "train.precision=bf16", f"engine.backend={engine}"]
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "train", *args, f"run.dir={tmp_path}"],
        cwd=REPO,
        env=subprocess_env() | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert math.isfinite(records[1]["val_loss"])
