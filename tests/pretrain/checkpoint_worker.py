"""torchrun worker: every rank restores the fake checkpoints under ROOT through the job's real collectives, then
writes OUT_DIR/rank_R.json: the step and data position it loaded, and how many files verification hashed and
how many directories it scanned for pickles on that rank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pretrain import safety
from pretrain.checkpoint import CheckpointManager
from pretrain.engines import barrier, init_distributed, shutdown
from pretrain.engines.dist import broadcast_int
from tests.pretrain.pretrain_fakes import FakeData, FakeEngine


def count_reads() -> dict[str, int]:
    """Counts, from now on in this process, the files verification hashes and the directories it scans."""
    reads = {"hashed": 0, "scanned": 0}
    sha256, scan = safety._sha256, safety.check_pickles_under

    def counted_sha256(path: Path) -> str:
        reads["hashed"] += 1
        return sha256(path)

    def counted_scan(directory: Path) -> list[Path]:
        reads["scanned"] += 1
        return scan(directory)

    safety._sha256, safety.check_pickles_under = counted_sha256, counted_scan
    return reads


if __name__ == "__main__":
    root, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    info = init_distributed(timeout_s=60)
    reads = count_reads()
    manager = CheckpointManager(root, keep=3, dist=info, barrier=barrier, broadcast=broadcast_int)
    data = FakeData()
    state = manager.restore(engine=FakeEngine(), data=data)
    assert state is not None
    (out_dir / f"rank_{info.rank}.json").write_text(
        json.dumps({"step": state.step, "position": data.position, **reads})
    )
    shutdown()
