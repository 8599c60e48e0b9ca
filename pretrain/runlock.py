"""One trainer per run directory: a lock file (`RUN_DIR/.lock`) that rank 0 holds for the run's life.

Two trainers on one run directory (a job submitted twice) would both write checkpoints and metrics over each
other. The lock is `flock` on `RUN_DIR/.lock`, so the kernel releases it when the holder dies, however it dies;
the holder writes who it is (host, pid, since when) into the file, for the message the second trainer prints.
On NFS, Linux emulates `flock` with NFS byte-range locks, which every client sees when the file system is mounted
with locking (the default; not with `nolock` or `local_lock=flock|all`); a node that dies without releasing keeps
the lock until the server's lease runs out (NFSv4: about 90 s), so a requeued job should pass `--wait-lock`.
Torch-free: taking the lock needs nothing but the standard library.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from pretrain.errors import UserError

LOCK_FILE = ".lock"
_POLL_S = 0.5


class RunLockedError(UserError):
    """Another trainer holds the run directory (the same verdict on every rank: rank 0 decides)."""

    agreed = True


class RunLock:
    """`flock` on RUN_DIR/.lock: `acquire` (optionally waiting), `release` (also done by the OS at exit)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, *, wait_s: float = 0.0) -> RunLock:
        """Take the lock, waiting up to `wait_s` seconds for a holder to end; RunLockedError names the holder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self.holder()
                    os.close(fd)
                    raise RunLockedError(self._refusal(holder, wait_s)) from None
                time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))
        since = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since}).encode(), 0
        )
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the file (no stale holder to read) and let go; a no-op when not held."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def holder(self) -> dict[str, object]:
        """Who holds the lock, as the holder wrote it (empty while it is still writing)."""
        try:
            found = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def _refusal(self, holder: dict[str, object], wait_s: float) -> str:
        who = (
            f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"
            if holder
            else "holder not written yet"
        )
        waited = f" (waited {wait_s:g} s)" if wait_s > 0 else ""
        return (
            f"run directory {self.run_dir} is in use by another trainer ({who}){waited}; let it finish or stop "
            f"it, or pass --wait-lock SECONDS to wait for it (lock: {self.path})"
        )
