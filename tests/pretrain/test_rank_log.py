"""Each rank's own log file (PRETRAIN_RANK_LOG_DIR): the console stays as it was, the file gets every line as it
is printed (a SIGKILL loses nothing), a hard crash's stack, and appends across starts."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

from pretrain.console import RANK_LOG_DIR_ENV, _Tee
from tests.common import REPO, subprocess_env

# Prints to both streams (the last write has no newline), then dies as a cluster's SIGKILL or a segfault ends it.
SCRIPT = """
import faulthandler, os, signal, sys
from pretrain.console import open_rank_log, say
open_rank_log(3)
print("on stdout", flush=True)
say("on stderr")
sys.stderr.write("no newline yet")
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
faulthandler._sigsegv()
"""
HEADER = re.compile(r"\d\d:\d\d:\d\d rank log: rank 3 of 1, pid \d+ on \S+\n")


def _run(how: str, log_dir: Path | None) -> subprocess.CompletedProcess[str]:
    env = subprocess_env()
    env.pop(RANK_LOG_DIR_ENV, None)
    if log_dir is not None:
        env[RANK_LOG_DIR_ENV] = str(log_dir)
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, how], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )


def _untimed(text: str) -> str:
    return re.sub(r"\d\d:\d\d:\d\d", "HH:MM:SS", text)


def test_a_killed_rank_keeps_every_printed_line_and_the_console_is_unchanged(tmp_path: Path) -> None:
    plain, teed = _run("kill", None), _run("kill", tmp_path / "logs")
    assert plain.returncode == teed.returncode == -9
    assert (_untimed(teed.stdout), _untimed(teed.stderr)) == (_untimed(plain.stdout), _untimed(plain.stderr))
    text = (tmp_path / "logs" / "rank-3.log").read_text()
    header = HEADER.match(text)
    assert header, text
    assert teed.stderr.endswith(" on stderr\nno newline yet")
    # every line in the order written; the file is written a line at a time, so the unfinished one is not there
    assert text[header.end() :] == teed.stdout + teed.stderr.removesuffix("no newline yet")


def test_a_live_progress_bar_leaves_plain_lines_in_the_file() -> None:
    """On a terminal rich redraws its bar in place (carriage returns, control sequences) many times a second:
    the console gets every byte, the file the lines as they end up on the screen."""
    console, file = io.StringIO(), io.StringIO()
    tee = _Tee(console, file)
    writes = [
        "\x1b[?25l\x1b[1mtrain\x1b[0m \x1b[32m0/20\x1b[0m",
        "\r\x1b[2K\x1b[1mtrain\x1b[0m 1/20",
        "\r\x1b[2K12:00:00 starting\n\x1b[1mtrain\x1b[0m 1/20",
        *(f"\r\x1b[2Ktrain {step}/20" for step in range(2, 20)),
        "\r\nwindows line\r\n",
        "train 20/20\n\x1b[?25h",
        "no newline",
    ]
    for text in writes:
        tee.write(text)
    assert console.getvalue() == "".join(writes)
    assert file.getvalue() == "12:00:00 starting\ntrain 19/20\nwindows line\ntrain 20/20\n"
    tee.finish()  # at the end of the run: the unfinished line too
    assert file.getvalue().endswith("train 20/20\nno newline\n")


def test_a_hard_crash_leaves_its_stack_in_the_file_and_starts_append(tmp_path: Path) -> None:
    _run("kill", tmp_path)
    crashed = _run("segfault", tmp_path)
    assert crashed.returncode != 0
    text = (tmp_path / "rank-3.log").read_text()
    assert len(HEADER.findall(text)) == 2  # the first start's lines are kept
    second = text[list(HEADER.finditer(text))[1].end() :]
    assert second.startswith("on stdout\n") and "Fatal Python error: Segmentation fault" in second
    assert 'File "<string>", line 10' in second  # faulthandler's stack, pointing at the crash
    assert "Fatal Python error" not in crashed.stderr  # the console is as it was without the file


def test_pretrain_train_logs_its_exit_and_an_unusable_dir_is_one_warning(tmp_path: Path) -> None:
    """Through the real entry point under a 2-process launcher's variables (the os._exit path): rank 0's file
    holds its one-line error and the exit code; rank 1 prints nothing (the error is agreed) but is logged."""
    args = [sys.executable, "-m", "pretrain", "train", "configs/gpt-tiny.yaml", "train.max_stesp=1"]
    for rank in (0, 1):
        env = subprocess_env(
            **{
                RANK_LOG_DIR_ENV: str(tmp_path),
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "WANDB_MODE": "disabled",
            }
        )
        done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        lines = (tmp_path / f"rank-{rank}.log").read_text().splitlines()
        assert re.fullmatch(rf"\d\d:\d\d:\d\d rank log: rank {rank} of 2, pid \d+ on \S+", lines[0])
        assert lines[1:-1] == done.stderr.splitlines() and len(lines[1:-1]) == 1 - rank, lines
        assert re.fullmatch(r"\d\d:\d\d:\d\d rank log: exit 2", lines[-1])
    (tmp_path / "file").write_text("")
    env = subprocess_env(**{RANK_LOG_DIR_ENV: str(tmp_path / "file" / "logs"), "WANDB_MODE": "disabled"})
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    first, second = done.stderr.splitlines()
    assert re.fullmatch(
        rf"\d\d:\d\d:\d\d warning: no rank log file {tmp_path}/file/logs/rank-0.log \(.+\); "
        "output goes to the console only",
        first,
    ), first
    assert second.startswith("error: ") and done.returncode == 2
