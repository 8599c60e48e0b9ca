"""pretrain.safety: code-running pickles are refused without running, real checkpoints pass, manifests catch
damage, secrets are masked."""

from __future__ import annotations

import io
import os
import pickle
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from pretrain import safety
from pretrain.redaction import redact, secret_values
from pretrain.safety import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    check_pickle_file,
    check_pickles_under,
    verify_manifest,
    write_manifest,
)


class _Touch:
    """Unpickling this runs `touch marker` (the classic pickle exploit)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


def test_payload_really_runs_code_when_unpickled(marker: Path) -> None:
    # Positive control: without the check, this payload does execute.
    pickle.loads(pickle.dumps(_Touch(marker)))
    assert marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_raw_pickle_with_code_is_refused_and_nothing_runs(
    tmp_path: Path, marker: Path, protocol: int
) -> None:
    path = tmp_path / "optimizer.pkl"
    path.write_bytes(pickle.dumps({"state": {}, "x": _Touch(marker)}, protocol=protocol))
    with pytest.raises(UnsafeCheckpointError) as err:
        check_pickle_file(path)
    assert err.value.global_name == f"{os.system.__module__}.system"
    assert str(path) in str(err.value) and "posix.system" in str(err.value)
    with pytest.raises(UnsafeCheckpointError):
        check_pickle_file(path)
    assert not marker.exists()


def test_torch_zip_with_code_is_refused_and_nothing_runs(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(3)}, "evil": _Touch(marker)}, path)
    with pytest.raises(
        UnsafeCheckpointError, match=r"mp_rank_00_model_states\.pt:.*data\.pkl.*'posix\.system'"
    ):
        check_pickle_file(path)
    with pytest.raises(UnsafeCheckpointError):
        check_pickles_under(tmp_path)
    with pytest.raises(UnsafeCheckpointError):
        check_pickle_file(path)
    assert not marker.exists()


def test_dcp_item_with_code_is_refused(tmp_path: Path, marker: Path) -> None:
    # DCP loads non-tensor items with torch.load(weights_only=False): the check must look inside .distcp.
    dcp.save({"w": torch.ones(4), "extra": {"evil": _Touch(marker)}}, checkpoint_id=tmp_path, no_dist=True)
    with pytest.raises(UnsafeCheckpointError, match=r"\.distcp@\d+:.*'posix\.system'"):
        check_pickles_under(tmp_path)
    (distcp,) = tmp_path.glob("*.distcp")
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        check_pickle_file(distcp)  # also found without the metadata's offsets
    assert not marker.exists()


def _op_str(s: str) -> bytes:
    return b"\x8c" + bytes([len(s)]) + s.encode()


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (b"cos\nsystem\n(S'touch X'\ntR.", "os.system"),  # protocol 0 GLOBAL
        (b"(S'touch X'\nios\nsystem\n.", "os.system"),  # INST
        (b"\x80\x04" + _op_str("builtins") + b"\x94" + _op_str("eval") + b"\x94\x93\x94.", "builtins.eval"),
        (b"\x80\x04" + _op_str("builtins") + _op_str("getattr") + b"\x93.", "builtins.getattr"),
        (b"\x80\x04" + _op_str("builtins") + _op_str("__import__") + b"\x93.", "builtins.__import__"),
        (b"\x80\x04" + _op_str("subprocess") + _op_str("Popen") + b"\x93.", "subprocess.Popen"),
        # memoised operands fetched back with BINGET
        (
            b"\x80\x04" + _op_str("posix") + b"\x94" + _op_str("system") + b"\x94h\x00h\x01\x93.",
            "posix.system",
        ),
        # a dotted name under an allowed module resolves to something else entirely
        (
            b"\x80\x04" + _op_str("collections") + _op_str("OrderedDict.fromkeys") + b"\x93.",
            "OrderedDict.fromkeys",
        ),
        (b"\x80\x02\x82\x01.", "copyreg extension"),  # EXT1: a global from copyreg's registry
        # STACK_GLOBAL whose module name is computed by a call
        (
            b"\x80\x04" + _op_str("_codecs") + _op_str("encode") + b"\x93)R" + _op_str("system") + b"\x93.",
            "computed",
        ),
        (b"\x80\x04})R.", "calls (REDUCE) a value"),  # calling something that is not a global
        (b"(}o.", "calls (OBJ) a value"),
    ],
)
def test_crafted_pickles_are_refused(tmp_path: Path, payload: bytes, named: str) -> None:
    path = tmp_path / "x.pkl"
    path.write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(named)):
        check_pickle_file(path)


def test_tar_trailing_and_broken_files_are_refused(tmp_path: Path) -> None:
    tar_path = tmp_path / "legacy.pt"
    with tarfile.open(tar_path, "w") as tar:
        tar.addfile(tarfile.TarInfo("pickle"), io.BytesIO(b""))
    with pytest.raises(UnsafeCheckpointError, match="tar archive"):
        check_pickle_file(tar_path)

    trailing = tmp_path / "trailing.pkl"
    trailing.write_bytes(pickle.dumps([1, 2]) + pickle.dumps(_Touch(tmp_path / "m")))
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        check_pickle_file(trailing)  # a second pickle after the first is checked too

    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(1000)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CorruptCheckpointError, match="truncated.pt: damaged zip"):
        check_pickle_file(truncated)
    half = tmp_path / "half.pkl"
    half.write_bytes(pickle.dumps({"a": list(range(100))})[:50])
    with pytest.raises(CorruptCheckpointError, match="not a readable pickle"):
        check_pickle_file(half)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="empty"):
        check_pickle_file(empty)


def test_plain_tensors_containers_and_numpy_pass_and_load(tmp_path: Path) -> None:
    value = {
        "tensors": {
            str(dt): torch.ones(2, dtype=dt)
            for dt in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.complex64)
        },
        "param": torch.nn.Parameter(torch.arange(3.0)),
        "view": torch.arange(10.0)[2:5],
        "meta": (
            torch.float32,
            torch.device("cpu"),
            torch.Size([2, 3]),
            {1, 2},
            frozenset({3}),
            slice(1, 2),
            1 + 2j,
            b"raw",
            bytearray(b"x"),
        ),
        "numpy_rng": np.random.RandomState(0).get_state(),
        "numpy": (np.arange(4), np.float32(1.5), np.int64(7)),
        "adamw": torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))]).state_dict(),
    }
    path = tmp_path / "state.pt"
    torch.save(value, path)
    check_pickle_file(path)
    loaded = torch.load(path, weights_only=False)
    assert torch.equal(loaded["view"], torch.arange(2.0, 5.0))
    assert loaded["meta"] == value["meta"]
    assert np.array_equal(loaded["numpy_rng"][1], value["numpy_rng"][1])
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"step": 3, "names": ["a"], "t": (1.0, None)}))
    assert sorted(p.name for p in check_pickles_under(tmp_path)) == ["plain.pkl", "state.pt"]
    small = tmp_path / "small.pt"
    torch.save({"w": torch.arange(6).reshape(2, 3)}, small)
    check_pickle_file(small)
    assert torch.equal(torch.load(small, weights_only=True)["w"], torch.arange(6).reshape(2, 3))


def test_every_allowed_builtin_keeps_its_name_under_python2_mapping() -> None:
    # Protocol < 3 pickles go through _compat_pickle; an allowed legacy name must not map to something else.
    import _compat_pickle

    for module, name in safety.ALLOWED_GLOBALS:
        mapped = _compat_pickle.NAME_MAPPING.get(
            (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
        )
        assert mapped[1] == name and mapped[0] in (module, "builtins"), (module, name, mapped)


def test_deepspeed_dynamic_loss_scaler_passes(tmp_path: Path) -> None:
    # fp16 ZeRO states hold a DynamicLossScaler; fp16 cannot run on this CPU, so pickle one directly.
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    path = tmp_path / "optim_states.pt"
    scaler = DynamicLossScaler(
        init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2, consecutive_hysteresis=False
    )
    torch.save({"loss_scaler": scaler}, path)
    check_pickle_file(path)


# --------------------------------------------------------------------------------------------- manifest


def _checkpoint(tmp_path: Path) -> Path:
    ckpt = tmp_path / "step_4"
    (ckpt / "engine").mkdir(parents=True)
    torch.save({"w": torch.ones(64)}, ckpt / "engine" / "mp_rank_00_model_states.pt")
    (ckpt / "trainer_state.json").write_text('{"step": 4}')
    return ckpt


def test_manifest_round_trip_lists_every_file(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    manifest = write_manifest(ckpt)
    verify_manifest(ckpt)
    import json

    files = json.loads(manifest.read_text())["files"]
    assert sorted(files) == ["engine/mp_rank_00_model_states.pt", "trainer_state.json"]
    assert files["trainer_state.json"]["size"] == len('{"step": 4}')
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "engine",
        "manifest.json",
        "trainer_state.json",
    ]  # no temp left


def test_manifest_names_the_damaged_file(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    with pytest.raises(CorruptCheckpointError, match="manifest.json: missing: the checkpoint is incomplete"):
        verify_manifest(ckpt)
    write_manifest(ckpt)
    weights = ckpt / "engine" / "mp_rank_00_model_states.pt"
    data = weights.read_bytes()

    weights.write_bytes(data[:-100])
    with pytest.raises(
        CorruptCheckpointError,
        match=rf"mp_rank_00_model_states.pt: size {len(data) - 100} bytes, manifest says {len(data)}",
    ):
        verify_manifest(ckpt)

    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CorruptCheckpointError, match="mp_rank_00_model_states.pt: content differs"):
        verify_manifest(ckpt)

    weights.unlink()
    with pytest.raises(CorruptCheckpointError, match="mp_rank_00_model_states.pt: missing"):
        verify_manifest(ckpt)

    weights.write_bytes(data)
    verify_manifest(ckpt)
    (ckpt / "engine" / "extra.pt").write_bytes(b"x")
    with pytest.raises(CorruptCheckpointError, match="extra.pt: not listed"):
        verify_manifest(ckpt)


# --------------------------------------------------------------------------------------------- secrets


def test_redact_and_secret_values() -> None:
    env = {
        "WANDB_API_KEY": "k" * 40,
        "HF_TOKEN": "hf_abcdef",
        "DB_PASSWORD": "hunter22",
        "AWS_SECRET": "s3cr3t!",
        "PATH": "/usr/bin",
        "X_TOKEN": "ab",
    }
    secrets = secret_values(env)
    assert sorted(secrets) == sorted(["k" * 40, "hf_abcdef", "hunter22", "s3cr3t!"])
    text = f"key={'k' * 40} tok=hf_abcdef pw=hunter22 path=/usr/bin ab"
    assert redact(text, secrets) == "key=*** tok=*** pw=*** path=/usr/bin ab"


# --------------------------------------------------------------------------------------------- real saves

_REAL_SAVES = textwrap.dedent(
    """
    import os, sys
    from datetime import timedelta
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch, deepspeed, torch.distributed as dist
    from torch import nn
    out = sys.argv[1]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    for stage, prec in ((2, "bf16"), (3, "fp32")):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
        cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
               "zero_optimization": {"stage": stage}, "bf16": {"enabled": prec == "bf16"}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        x = torch.randn(2, 8, dtype=torch.bfloat16 if prec == "bf16" else torch.float32)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
        engine.save_checkpoint(f"{out}/ds_zero{stage}", tag="step_1", client_state={"step": 1})
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    model = nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model, opt = acc.prepare(model, opt)
    acc.backward(model(torch.ones(2, 4)).sum())
    opt.step()
    acc.save_state(f"{out}/accelerate")
    import torch.distributed.checkpoint as dcp
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=f"{out}/dcp")
    """
)


@pytest.mark.slow
def test_real_deepspeed_accelerate_and_dcp_checkpoints_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "1"}
    subprocess.run(
        [sys.executable, "-c", _REAL_SAVES, str(tmp_path), "29541"],
        check=True,
        env=env,
        timeout=600,
        capture_output=True,
    )
    checked = {p.relative_to(tmp_path).as_posix() for p in check_pickles_under(tmp_path)}
    assert {
        "ds_zero2/step_1/mp_rank_00_model_states.pt",
        "ds_zero2/step_1/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "ds_zero3/step_1/zero_pp_rank_0_mp_rank_00_model_states.pt",
        "ds_zero3/step_1/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "accelerate/optimizer.bin",
        "accelerate/random_states_0.pkl",
        "dcp/.metadata",
        "dcp/__0_0.distcp",
    } <= checked
    # Each DeepSpeed entry of the allow-list is needed by these real files: without it they are refused.
    for entry in [
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ]:
        monkeypatch.setattr(safety, "ALLOWED_GLOBALS", safety.ALLOWED_GLOBALS - {entry})
        with pytest.raises(UnsafeCheckpointError, match="optim_states.pt") as err:
            check_pickles_under(tmp_path / "ds_zero2")
        assert err.value.global_name == ".".join(entry)
        monkeypatch.undo()
