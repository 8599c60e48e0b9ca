"""`launch` command building and argument checks: exact command lines and script contents, no processes started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.cli import main
from launch.external import read_hostfile
from launch.job import TrainJob
from pretrain.plan import ENGINES
from tests.common import REPO

PY = sys.executable
TORCHRUN = [PY, "-m", "launch.agent"]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gpt.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "gpt-tiny"}, "run": {"dir": str(tmp_path / "run")}}))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def dry(capsys, *argv: str) -> str:
    code, out, err = run_cli(capsys, *argv[:1], "--dry-run", *argv[1:])
    assert (code, err) == (0, ""), err
    return out


def test_local_is_standalone_torchrun(capsys, config):
    out = dry(capsys, "local", "--nproc", "2", "--max-restarts", "1", str(config), "train.max_steps=5")
    assert out.split() == [
        *TORCHRUN,
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--max-restarts=1",
        "-m",
        "pretrain",
        "train",
        str(config),
        "train.max_steps=5",
    ]


def test_wait_lock_is_passed_to_pretrain_train(capsys, config):
    out = dry(capsys, "local", "--nproc", "1", "--wait-lock", "120", str(config))
    assert out.split()[-5:] == ["pretrain", "train", "--wait-lock", "120", str(config)]
    script = dry(capsys, "slurm", "--nodes", "1", "--gpus-per-node", "0", "--wait-lock", "90", str(config))
    assert f"-m pretrain train --wait-lock 90 {config}" in script


@pytest.mark.parametrize(("rank", "is_host"), [(0, 1), (1, 0)])
def test_torchrun_node_uses_c10d_rendezvous_hosted_by_rank0(capsys, config, rank, is_host):
    argv = [
        "torchrun",
        "--nnodes",
        "2:4",
        "--node-rank",
        str(rank),
        "--master",
        "10.0.0.1:29400",
        "--nproc",
        "8",
    ]
    out = dry(capsys, *argv, "--rdzv-id", "exp7", str(config))
    assert out.split() == [
        *TORCHRUN,
        "--nnodes=2:4",
        f"--node-rank={rank}",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.1:29400",
        "--rdzv-id=exp7",
        f"--rdzv-conf=is_host={is_host}",
        "--nproc-per-node=8",
        "--max-restarts=0",
        "-m",
        "pretrain",
        "train",
        str(config),
    ]


def test_slurm_script_for_multi_node_gpu_job(capsys, config, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-1234567890")
    out = dry(
        capsys,
        "slurm",
        "--nodes", "4",
        "--gpus-per-node", "8",
        "--time", "2-00:00:00",
        "--partition", "gpu",
        "--account", "proj",
        "--signal-lead", "240",
        "--sbatch-arg=--mem=0",
        str(config),
        "train.max_steps=100",
        "wandb.name=my run",
    )  # fmt: skip
    lines = out.splitlines()
    directives = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    assert directives == [
        "--job-name=pretrain-run",
        "--nodes=4",
        "--ntasks-per-node=1",  # one torchrun per node
        "--gpus-per-node=8",
        "--cpus-per-task=16",  # 8 processes x (data.num_workers=1 + 1)
        "--time=2-00:00:00",
        "--partition=gpu",
        "--account=proj",
        f"--chdir={Path.cwd()}",
        f"--output={tmp_path / 'run' / 'slurm-%j.out'}",
        "--open-mode=append",
        "--requeue",
        "--signal=B:USR1@240",
        "--export=ALL",
        "--mem=0",
    ]
    assert 'RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    srun = out[out.index("\nsrun ") + 1 : out.index(" &\n")].replace("\\\n", " ").split()
    assert srun[:5] == [
        "srun",
        "--nodes=4",
        "--ntasks-per-node=1",
        "--cpus-per-task=16",
        "--kill-on-bad-exit=1",
    ]
    torchrun = srun[srun.index(PY) :]
    assert torchrun == [
        *TORCHRUN,
        "--nnodes=4",
        "--nproc-per-node=8",
        "--max-restarts=0",
        "--rdzv-backend=c10d",
        '--rdzv-endpoint="$RDZV_HOST:$RDZV_PORT"',
        '--rdzv-id="$SLURM_JOB_ID"',
        "-m",
        "pretrain",
        "train",
        str(config),
        "train.max_steps=100",
        "'wandb.name=my",
        "run'",
    ]
    assert "PET_RDZV_CONF=is_host=$((SLURM_NODEID == 0))" in out  # node 0 hosts the rendezvous
    usr1_trap = next(line for line in lines if line.startswith("trap ") and line.endswith(" USR1"))
    assert 'kill -s USR1 "${SRUN_PID:-}"' in usr1_trap  # the pre-timeout signal goes on to srun's tasks
    assert 'scontrol requeue "$SLURM_JOB_ID"' in out  # the shell's fallback requeue after USR1
    assert "TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in out
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=240" in out
    assert "secret-key" not in out and "WANDB_API_KEY=" not in out
    syntax = subprocess.run(["bash", "-n"], input=out, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr


def test_slurm_script_fit_for_a_cluster(capsys, config, tmp_path):
    """CPUs from data.num_workers, --mem, --setup lines on every node, per-rank log files."""
    setup = tmp_path / "setup.sh"
    setup.write_text("module load cuda/12.4\nexport NCCL_DEBUG=WARN\n")
    argv = ["--nodes", "2", "--gpus-per-node", "4", "--mem", "256G", "--setup", str(setup)]
    out = dry(capsys, "slurm", *argv, str(config), "data.num_workers=3")
    assert "#SBATCH --cpus-per-task=16\n" in out and "#SBATCH --mem=256G\n" in out  # 4 x (3 + 1)
    assert (
        "pretrain_setup() {\nmodule load cuda/12.4\nexport NCCL_DEBUG=WARN\n}\nexport -f pretrain_setup\n"
        in out
    )
    srun = out[out.index("\nsrun ") + 1 : out.index(" &\n")]
    assert "bash -c 'pretrain_setup || exit $?; " in srun  # on every node, before torchrun
    # no torchrun --tee (its tail threads drop a stopped job's last lines from slurm-%j.out): each rank of
    # `pretrain train` writes its own file, in a folder per job beside slurm-%j.out
    assert "--tee" not in srun and "PET_LOG_DIR" not in srun
    assert f"\nexport PRETRAIN_RANK_LOG_DIR={tmp_path / 'run' / 'logs'}/slurm-$SLURM_JOB_ID\n" in out
    out = dry(capsys, "slurm", "--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "5", str(config))
    assert "#SBATCH --cpus-per-task=5\n" in out and "--mem" not in out and "pretrain_setup" not in out
    syntax = subprocess.run(["bash", "-n"], input=out, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr


def test_launch_default_num_workers_is_the_data_default():
    from data.config import DataConfig
    from launch.slurm import DEFAULT_NUM_WORKERS

    assert DataConfig().num_workers == DEFAULT_NUM_WORKERS


def test_slurm_cpu_job_has_no_gpus_and_one_process(capsys, config):
    out = dry(capsys, "slurm", "--nodes", "1", "--gpus-per-node", "0", str(config))
    directives = [line for line in out.splitlines() if line.startswith("#SBATCH")]
    assert not [
        d for d in directives if d.startswith(("#SBATCH --gpus", "#SBATCH --time", "#SBATCH --partition"))
    ]
    assert "--nproc-per-node=1 " in out
    assert "--signal=B:USR1@180" in out  # the default lead


def test_slurm_submits_with_sbatch_and_prints_the_job_id(capsys, config, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch-args\necho "4242;cluster"\n')
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code, out, err = run_cli(capsys, "slurm", "--nodes", "2", "--gpus-per-node", "0", str(config))
    script = tmp_path / "run" / "launch-slurm.sbatch"
    assert (code, out) == (0, "4242\n")
    assert (tmp_path / "sbatch-args").read_text().split() == ["--parsable", str(script)]
    assert "#SBATCH --nodes=2" in script.read_text()
    assert "slurm-4242.out" in err


def test_slurm_gpu_job_prints_the_memory_plan_before_submitting(capsys, config, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "77"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code, out, err = run_cli(capsys, "slurm", "--nodes", "2", "--gpus-per-node", "8", str(config))
    assert (code, out) == (0, "77\n")
    lines = err.splitlines()
    assert "16 GPUs x 80 GiB, fp32, micro-batch 8 x 128 tokens" in lines[0]
    assert [line.split()[0] for line in lines[2:8]] == list(ENGINES)
    assert lines[8].startswith("recommended: engine.backend=ddp, without gradient checkpointing")
    assert "slurm-77.out" in lines[9]


def test_deepspeed_and_accelerate_commands(capsys, config):
    hostfile = REPO / "launch" / "examples" / "hostfile"
    assert read_hostfile(hostfile) == {"node001": 8, "node002": 8}
    out = dry(capsys, "deepspeed", "--hostfile", str(hostfile), "--master", "node001:29500", str(config))
    assert out.split() == [
        PY,
        "-m",
        "deepspeed.launcher.runner",
        f"--hostfile={hostfile}",
        "--launcher=pdsh",
        "--master_addr=node001",
        "--master_port=29500",
        "--no_local_rank",
        "--module",
        "pretrain",
        "train",
        str(config),
    ]
    acc = REPO / "launch" / "accelerate" / "two-nodes.yaml"
    out = dry(capsys, "accelerate", "--config", str(acc), "--machine-rank", "1", str(config), "train.lr=1e-3")
    assert out.split() == [
        PY,
        "-m",
        "accelerate.commands.launch",
        f"--config_file={acc}",
        "--machine_rank=1",
        "-m",
        "pretrain",
        "train",
        str(config),
        "train.lr=1e-3",
    ]


@pytest.mark.parametrize(
    "path", sorted((REPO / "launch" / "accelerate").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_accelerate_configs_load_in_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.num_processes % cfg.num_machines == 0


def test_run_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bare = tmp_path / "bare.yaml"
    bare.write_text("model: {preset: gpt-tiny}\n")
    assert TrainJob(config=bare).run_dir() == tmp_path / "runs" / "bare"
    with_dir = tmp_path / "c.yaml"
    with_dir.write_text("run: {dir: out/a}\n")
    assert TrainJob(config=with_dir).run_dir() == tmp_path / "out" / "a"
    assert TrainJob(config=with_dir, overrides=("run.dir=/x/b",)).run_dir() == Path("/x/b")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["slurm", "--nodes", "0", "--gpus-per-node", "1", "CFG"], "argument --nodes: must be >= 1, got 0"),
        (["local", "--nproc", "zero", "CFG"], "argument --nproc: must be an integer >= 1, got 'zero'"),
        (["local", "--nproc", "2", "missing.yaml"], "config file not found: missing.yaml"),
        (["local", "--nproc", "2", "CFG", "train.lr"], "override 'train.lr' is not key.path=value"),
        (
            ["torchrun", "--nnodes", "2", "--node-rank", "0", "--master", "host", "--nproc", "1", "CFG"],
            "--master must be HOST:PORT with a port in 1-65535, got 'host'",
        ),
        (
            ["torchrun", "--nnodes", "2", "--node-rank", "0", "--master", "h:70000", "--nproc", "1", "CFG"],
            "port in 1-65535, got 'h:70000'",
        ),
        (
            ["torchrun", "--nnodes", "4:2", "--node-rank", "0", "--master", "h:1", "--nproc", "1", "CFG"],
            "--nnodes 4:2: MIN must not exceed MAX",
        ),
        (
            ["slurm", "--nodes", "1", "--gpus-per-node", "0", "--time", "1h", "CFG"],
            "--time must be a SLURM time",
        ),
        (["deepspeed", "--hostfile", "nope", "CFG"], "hostfile not found: nope"),
        (["local", "--nproc", "1", "--wait-lock", "soon", "CFG"], "--wait-lock: must be a number of seconds"),
        (["accelerate", "--config", "nope.yaml", "CFG"], "accelerate config not found: nope.yaml"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(capsys, config, argv, message):
    argv = [str(config) if a == "CFG" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"run: [unclosed\n", "is not valid YAML: while parsing a flow"),
        (b"\xff\xfe\x00", "is not a text (YAML) file"),
    ],
)
@pytest.mark.parametrize(
    ("argv", "what"),
    [
        (
            ["slurm", "--nodes", "1", "--gpus-per-node", "0", "--dry-run", "--no-check", "BAD"],
            "launch slurm: config file",
        ),
        (["accelerate", "--config", "BAD", "CFG"], "launch accelerate: accelerate config"),
    ],
)
def test_unreadable_yaml_is_one_line(tmp_path, config, capsys, content, problem, argv, what):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    argv = [str(bad) if a == "BAD" else str(config) if a == "CFG" else a for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith(f"error: {what} {bad} {problem}") and err.count("\n") == 1, err


def test_bad_hostfile_names_the_line(tmp_path, config, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# ok\nnode1 slots=8\nnode2 8\n")
    code, _, err = run_cli(capsys, "deepspeed", "--hostfile", str(hostfile), str(config))
    assert code == 2
    assert (
        err
        == f"error: launch deepspeed: hostfile {hostfile} line 3: expected 'HOST slots=N', got 'node2 8'\n"
    )


def test_console_script_exits_2_without_traceback(tmp_path):
    done = subprocess.run(
        [PY, "-m", "launch", "slurm", "--nodes", "0", "--gpus-per-node", "1", "x.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == "error: launch slurm: argument --nodes: must be >= 1, got 0\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["local", "--nproc", "2"],
        ["torchrun", "--nnodes", "2", "--node-rank", "0", "--master", "127.0.0.1:29400", "--nproc", "2"],
        ["slurm", "--nodes", "2", "--gpus-per-node", "0"],
    ],
    ids=["local", "torchrun", "slurm"],
)
def test_a_bad_run_config_is_one_line_before_any_worker_or_job(capsys, config, argv, tmp_path, monkeypatch):
    """`pretrain check` runs first: no torchrun (whose traceback would bury the line), no queued sbatch job."""
    started: list[str] = []
    monkeypatch.setattr(os, "execvpe", lambda file, *_: started.append(file))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/submitted\necho 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code, out, err = run_cli(capsys, *argv, str(config), "train.max_steps=-1")
    problem = "train.max_steps: Input should be greater than or equal to 0 (got -1)"
    assert (code, out, err) == (2, "", f"error: launch {argv[0]}: run config {config}: {problem}\n")
    assert started == [] and not (tmp_path / "submitted").exists()


def test_no_check_submits_without_checking_the_run_config(capsys, config, tmp_path, monkeypatch):
    """For clusters whose data is visible on the compute nodes only: the job itself still checks it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 7\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    argv = ["slurm", "--nodes", "1", "--gpus-per-node", "0", "--no-check", str(config), "train.max_steps=-1"]
    assert run_cli(capsys, *argv)[:2] == (0, "7\n")


def test_a_good_run_config_passes_the_check_and_starts_torchrun(capsys, config, monkeypatch):
    started: list[list[str]] = []
    envs: list[dict] = []

    def execvpe(file: str, args: list[str], env: dict) -> None:
        started.append(args)
        envs.append(env)
        raise SystemExit(0)  # the real one never returns

    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.setattr(os, "execvpe", execvpe)
    with pytest.raises(SystemExit):
        main(["local", "--nproc", "2", str(config)])
    assert capsys.readouterr() == ("", "")
    assert started and started[0][:3] == TORCHRUN
    assert envs[0]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "300"  # time for the workers' checkpoint after Ctrl-C
    assert envs[0]["PRETRAIN_RANK_LOG_DIR"] == str(config.parent / "run" / "logs")  # RUN_DIR/logs/rank-R.log


@pytest.mark.parametrize(
    "argv",
    [["deepspeed"], ["accelerate", "--config", str(REPO / "launch" / "accelerate" / "two-nodes.yaml")]],
    ids=["deepspeed", "accelerate"],
)
def test_the_other_launchers_ask_for_rank_log_files_too(argv, capsys, config, monkeypatch):
    envs: list[dict] = []

    def execvpe(file: str, args: list[str], env: dict) -> None:
        envs.append(env)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execvpe", execvpe)
    with pytest.raises(SystemExit):
        main([*argv, "--no-check", str(config)])
    assert envs[0]["PRETRAIN_RANK_LOG_DIR"] == str(config.parent / "run" / "logs")
