"""`launch slurm` against the real local SLURM (tests/slurm/local-cluster.sh): a job trains to the end, and a job
stopped twice mid-run (the pre-timeout USR1, then `scontrol requeue`) checkpoints, reruns, resumes and finishes with
the losses of an uninterrupted run. W&B is offline, as users run it: its service process gets the job's signals
too, and in the second attempt the test kills it outright before the requeue.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch.launch_e2e import (
    CLUSTER_SCRIPT,
    MAX_STEPS,
    REPO,
    Attempt,
    Run,
    attempts_from_log,
    launch_cmd,
    losses_by_step,
    train_env,
    wait_for,
    wandb_services,
)

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def job_state(job_id: str) -> str:
    done = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
    )
    match = re.search(r"\bJobState=(\S+)", done.stdout)
    return match.group(1) if match else "UNKNOWN"


def submit(config: Path, *, nodes: int = 1) -> str:
    """`launch slurm` of a CPU job with 2 processes in all (on one node, or one per node on two)."""
    per_node = str(2 // nodes)
    done = subprocess.run(
        launch_cmd(
            "slurm", "--nodes", str(nodes), "--gpus-per-node", "0", "--nproc-per-node", per_node, str(config)
        ),
        env=train_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"\d+\n", done.stdout), done.stdout
    return done.stdout.strip()


def release_when_pending(job_id: str) -> None:
    """A requeued job waits ~2 min for its BeginTime; start it now (only possible once it is PENDING)."""
    wait_for(
        lambda: job_state(job_id) == "PENDING", timeout=90, what=f"job {job_id} to be requeued", interval=0.5
    )
    # slurmd revokes the old instance's credential on requeue and refuses any credential of that job created in
    # the same second ("Killing non-startable batch JobId=N: Job credential revoked" in slurmctld.log, and the job
    # ends FAILED): a restart released at once can land in that second. A real cluster's requeue waits minutes.
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True, timeout=30)


def wait_done(job_id: str, log: Path) -> None:
    def done() -> bool:
        return job_state(job_id) in {
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
        }

    wait_for(done, timeout=300, what=f"job {job_id} to finish", interval=0.5)
    state = job_state(job_id)
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{log.read_text()[-4000:]}"


@pytest.fixture
def job_ids():
    """Jobs submitted by a test; cancelled if the test leaves them behind."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


def test_submitted_job_trains_to_the_end(write_config, reference_losses, job_ids):
    config = write_config("slurm-plain")
    job_ids.append(job_id := submit(config))
    run = Run(config.parent / "slurm-plain")
    log = run.dir / f"slurm-{job_id}.out"
    wait_done(job_id, log)
    assert (run.dir / "launch-slurm.sbatch").exists()
    assert f"launch: job {job_id} restart 0" in log.read_text()
    assert losses_by_step(run.steps()) == reference_losses
    assert run.latest() == f"step_{MAX_STEPS}"


def rank_logs(run: Run, job_id: str) -> dict[str, str]:
    """The job's per-rank log files (RUN_DIR/logs/slurm-JOBID/rank-R.log) by name."""
    return {p.name: p.read_text() for p in sorted((run.dir / "logs" / f"slurm-{job_id}").glob("rank-*.log"))}


def test_setup_runs_on_the_node_and_each_rank_logs_to_its_own_file(write_config, job_ids, tmp_path):
    """--setup lines run in the node's task before torchrun; rank 0 and 1 each write their own file."""
    config = write_config("slurm-setup", train={"max_steps": 2})
    setup = tmp_path / "setup.sh"
    setup.write_text('echo "setup ran on node $SLURM_NODEID"\nexport PRETRAIN_SETUP_MARK=on\n')
    done = subprocess.run(
        launch_cmd("slurm", "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2")
        + ["--setup", str(setup), str(config)],
        env=train_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    job_ids.append(job_id := done.stdout.strip())
    run = Run(config.parent / "slurm-setup")
    log = run.dir / f"slurm-{job_id}.out"
    wait_done(job_id, log)
    assert "setup ran on node 0" in log.read_text()
    assert "done: step 2" in log.read_text()
    logs = rank_logs(run, job_id)
    assert sorted(logs) == ["rank-0.log", "rank-1.log"]
    for rank, text in enumerate(logs.values()):
        first, *_, last = text.splitlines()
        assert re.search(
            rf" rank log: rank {rank} of 2, pid \d+ on \S+, SLURM job {job_id} restart 0 on node \S+$", first
        )
        assert last.endswith(" rank log: exit 0"), text
    assert "done: step 2" in logs["rank-0.log"] and " step 2/2 " in logs["rank-0.log"]  # rank 0's own notes
    assert "done: step" not in logs["rank-1.log"] and " step 1/2 " not in logs["rank-1.log"]


def test_requeued_job_checkpoints_resumes_and_matches(write_config, reference_losses, job_ids):
    config = write_config("slurm-requeue", checkpoint={"every": 1000})  # only the signals checkpoint
    job_ids.append(job_id := submit(config))
    run = Run(config.parent / "slurm-requeue")
    log = run.dir / f"slurm-{job_id}.out"

    def attempts() -> list[Attempt]:
        return attempts_from_log(log.read_text()) if log.exists() else []

    # 1. The pre-timeout signal, as `#SBATCH --signal=B:USR1@N` sends it (which fires only to ~30 s accuracy):
    #    the job checkpoints and requeues itself.
    wait_for(lambda: run.last_step() >= 5, timeout=180, what="step 5", interval=0.05)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
    release_when_pending(job_id)
    # 2. W&B's service dies mid-run (as a cluster's signal kills it): one warning, training goes on.
    wait_for(
        lambda: len(attempts()) == 2 and len(attempts()[1].steps) >= 1 and bool(wandb_services(config)),
        timeout=180,
        what="the first restart's W&B service",
        interval=0.05,
    )
    for service in wandb_services(config):
        service.send_signal(signal.SIGKILL)
    killed_at = attempts()[1].steps[-1]
    # 3. A requeue from outside (preemption, an admin): SIGTERM to every process of the job.
    wait_for(
        lambda: len(attempts()[1].steps) >= 3 and attempts()[1].steps[-1] >= killed_at + 2,
        timeout=180,
        what="2 steps after W&B's service was killed",
        interval=0.05,
    )
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    release_when_pending(job_id)
    wait_done(job_id, log)

    text = log.read_text()
    assert "got SIGUSR1" in text
    assert "warning: W&B log failed (ConnectionResetError" in text
    assert "Traceback" not in text  # torchrun's SignalException ends as launch/agent.py's one line instead
    assert "launch: stopped by SIGTERM;" in text
    assert list(run.dir.glob("wandb/offline-run-*"))
    assert f"launch: job {job_id} restart 1" in text and f"launch: job {job_id} restart 2" in text
    runs = attempts()
    assert len(runs) == 3, runs
    report = []
    for before, after in zip(runs, runs[1:]):
        redone = before.steps[-1] - after.resumed_from
        report.append(
            f"stopped after step {before.steps[-1]}, resumed from {after.resumed_from}, {redone} redone"
        )
        assert after.resumed_from in run.checkpoints()  # written on the signal (checkpoint.every is 1000)
        assert redone == 0  # the checkpoint was taken at the step boundary right after the signal
    print("\n" + "; ".join(report))
    assert runs[-1].steps[-1] == MAX_STEPS
    assert losses_by_step(run.steps()) == reference_losses

    # Each rank's file holds all three attempts (appended), and slurm-%j.out still holds every line of them.
    logs = rank_logs(run, job_id)
    assert sorted(logs) == ["rank-0.log", "rank-1.log"]
    job_lines = set(text.splitlines())
    table = [f"slurm-{job_id}.out: {len(text.splitlines())} lines"]
    for name, rank_text in logs.items():
        starts = re.findall(
            rf" rank log: rank \d of 2, .*, SLURM job {job_id} restart (\d) on node ", rank_text, re.M
        )
        assert starts == ["0", "1", "2"], rank_text[-3000:]
        own = [line for line in rank_text.splitlines() if " rank log: " not in line]
        assert set(own) <= job_lines, sorted(set(own) - job_lines)[:5]
        table.append(f"{name}: {len(rank_text.splitlines())} lines ({len(own)} printed, 3 starts)")
    assert attempts_from_log(logs["rank-0.log"]) == runs  # every attempt's steps, as the job's log has them
    print("\n" + "; ".join(table))


@pytest.fixture(scope="session")
def two_nodes() -> list[str]:
    """The cluster's node names; a skip on one node. (Session-scoped so that it skips before the reference run.)"""
    listed = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30)
    nodes = sorted(set(listed.stdout.split()))
    if len(nodes) < 2:
        why = "a 1-node cluster: SLURM_LOCAL_NODES=2 tests/slurm/local-cluster.sh up gives it two"
        if os.environ.get("PRETRAIN_REQUIRE_SLURM_NODES") == "2":  # CI brings up two: the test must run there
            pytest.fail(why)
        pytest.skip(why)
    return nodes


def test_two_node_job_trains_across_both_nodes(two_nodes, write_config, reference_losses, job_ids):
    """`--nodes 2 --nproc-per-node 1`: a torchrun on each node, the rendezvous at the allocation's first host, one
    rank per node, and the losses of one node with two processes. Needs two nodes, which the local cluster has
    only when asked: `SLURM_LOCAL_NODES=2 tests/slurm/local-cluster.sh up` (two slurmd on this machine)."""
    nodes = two_nodes
    config = write_config("slurm-2nodes")
    job_ids.append(job_id := submit(config, nodes=2))
    run = Run(config.parent / "slurm-2nodes")
    log = run.dir / f"slurm-{job_id}.out"
    wait_done(job_id, log)
    started = re.search(
        rf"launch: job {job_id} restart 0 on (\S+) at \S+, rendezvous (\S+):\d+\n", log.read_text()
    )
    assert started, log.read_text()[-3000:]
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", started[1]], capture_output=True, text=True, timeout=30
    ).stdout.split()
    assert len(hosts) == 2 and set(hosts) <= set(nodes) and started[2] == hosts[0]
    ranks = {}  # rank -> the node its process ran on, from each rank's own log file
    for name, text in rank_logs(run, job_id).items():
        said = re.match(
            rf"\S+ rank log: rank (\d) of 2, .*, SLURM job {job_id} restart 0 on node (\S+)\n", text
        )
        assert said and name == f"rank-{said[1]}.log", text[:500]
        ranks[int(said[1])] = said[2]
    print(f"\n2-node job {job_id}: ranks on nodes {ranks}, rendezvous at {started[2]}")
    assert sorted(ranks) == [0, 1] and sorted(ranks.values()) == sorted(hosts)  # one rank on each node
    assert losses_by_step(run.steps()) == reference_losses  # world size 2 either way: the same numbers
    assert run.latest() == f"step_{MAX_STEPS}"


def test_cluster_script_is_idempotent():
    """`up` on a running cluster changes nothing and returns at once (CI may call it twice)."""
    started = time.monotonic()
    done = subprocess.run([str(CLUSTER_SCRIPT), "up"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "already up" in done.stderr
    assert time.monotonic() - started < 10
    assert subprocess.run(
        ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30
    ).stdout.strip() in {
        "idle",
        "mixed",
        "allocated",
    }
