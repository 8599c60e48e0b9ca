"""Real multi-process runs through `launch`: two "nodes" on loopback, a worker killed under --max-restarts, Ctrl-C,
and the DeepSpeed and Accelerate launchers.

Each test's losses are compared step by step with one uninterrupted 2-process run (`reference_losses`).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess

import psutil
import pytest
import yaml

from tests.launch.launch_e2e import (
    MAX_STEPS,
    REPO,
    Run,
    attempts_from_log,
    launch_cmd,
    losses_by_step,
    run_to_end,
    train_env,
    wait_for,
)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_match_one_node(write_config, reference_losses):
    config = write_config("two-nodes")
    master = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            launch_cmd(
                "torchrun", "--nnodes", "2", "--node-rank", str(rank), "--master", master, "--nproc", "1"
            )
            + ["--rdzv-id", "loopback", str(config)],
            env=train_env(),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=300)[0])
    finally:
        for node in nodes:
            node.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    run = Run(config.parent / "two-nodes")
    assert losses_by_step(run.steps()) == reference_losses  # world size 2 either way: same data, same numbers


def test_killed_worker_restarts_and_resumes_from_newest_checkpoint(write_config, reference_losses):
    config = write_config("elastic")
    run = Run(config.parent / "elastic")
    agent = subprocess.Popen(
        launch_cmd("local", "--nproc", "2", "--max-restarts", "1", str(config)),
        env=train_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # launch execs torchrun, so `agent` is the torchrun agent and its children are the workers.
        wait_for(lambda: run.last_step() >= 12, timeout=240, what="step 12")
        workers = psutil.Process(agent.pid).children()
        assert len(workers) == 2
        newest = run.latest()
        killed = workers[1].pid
        os.kill(killed, signal.SIGKILL)
        output = agent.communicate(timeout=300)[0]
    finally:
        agent.kill()
    assert agent.returncode == 0, output[-4000:]

    first, second = attempts_from_log(output)
    assert second.resumed_from == int(
        newest.removeprefix("step_")
    )  # the newest checkpoint when the worker died
    redone = first.steps[-1] - second.resumed_from
    print(
        f"\nkill -9 after step {first.steps[-1]}: resumed from step {second.resumed_from}, {redone} steps redone"
    )
    assert 0 <= redone < 10  # less than checkpoint.every
    assert second.steps == list(range(second.resumed_from + 1, MAX_STEPS + 1))
    assert losses_by_step(run.steps()) == reference_losses  # exact, before and after the resume point

    # Each rank's own file, RUN_DIR/logs/rank-R.log, appended by torchrun's restart: the killed rank's too.
    logs = {rank: (run.dir / "logs" / f"rank-{rank}.log").read_text() for rank in (0, 1)}
    first_pids = []
    for rank, text in logs.items():
        starts = list(re.finditer(rf" rank log: rank {rank} of 2, pid (\d+) on [^\s,]+(.*)$", text, re.M))
        assert [start[2] for start in starts] == ["", ", torchrun restart 1"], text[-3000:]
        first_pids.append(int(starts[0][1]))
        if first_pids[-1] == killed:  # its first start's lines are there, without an exit line
            assert " rank log: exit" not in text[starts[0].end() : starts[1].start()], text[-3000:]
        assert text.endswith(" rank log: exit 0\n")
    assert killed in first_pids
    assert attempts_from_log(logs[0]) == [first, second]  # rank 0 prints the steps, as the console has them
    assert not attempts_from_log(logs[1])


def test_ctrl_c_checkpoints_at_the_next_step_ends_in_one_line_and_resumes(write_config, reference_losses):
    config = write_config("ctrl-c", checkpoint={"every": 1000})  # only Ctrl-C checkpoints
    run = Run(config.parent / "ctrl-c")
    agent = subprocess.Popen(
        launch_cmd("local", "--nproc", "2", str(config)),
        env=train_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell's foreground job
    )
    try:
        wait_for(lambda: run.last_step() >= 3, timeout=240, what="step 3")
        signalled_after = run.last_step()
        os.killpg(agent.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        err = agent.communicate(timeout=120)[1]
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode == 130, err[-4000:]
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("launch: stopped by SIGINT;"), err[-4000:]
    said = re.findall(r"error: interrupted at step (\d+); checkpoint saved: run the same command again", err)
    assert len(said) == 1, err[-4000:]  # rank 0 alone says it
    stopped = int(said[0])
    print(f"\nCtrl-C after step {signalled_after}: stopped at step {stopped}; last line: {last}")
    assert signalled_after <= stopped <= signalled_after + 1  # the step in flight, then the checkpoint
    assert run.checkpoints() == [stopped] and run.latest() == f"step_{stopped}"

    done = run_to_end(launch_cmd("local", "--nproc", "2", str(config)), timeout=300)
    assert f"resuming at step {stopped}" in done.stderr
    assert losses_by_step(run.steps()) == reference_losses


@pytest.mark.parametrize("launcher", ["deepspeed", "accelerate"])
def test_deepspeed_and_accelerate_launchers_match_torchrun(
    launcher, write_config, reference_losses, tmp_path
):
    """The same 2-process run started by the DeepSpeed launcher or `accelerate launch` gives the same losses."""
    config = write_config(launcher)
    port = free_port()
    if launcher == "deepspeed":
        args = ["deepspeed", "--num-gpus", "2", "--master", f"127.0.0.1:{port}"]
    else:
        accelerate_config = yaml.safe_load((REPO / "launch" / "accelerate" / "cpu-2proc.yaml").read_text())
        (tmp_path / "accelerate-launcher.yaml").write_text(
            yaml.safe_dump(accelerate_config | {"main_process_port": port})
        )
        args = ["accelerate", "--config", str(tmp_path / "accelerate-launcher.yaml")]
    done = subprocess.run(
        launch_cmd(*args, str(config)), env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert losses_by_step(Run(config.parent / launcher).steps()) == reference_losses
