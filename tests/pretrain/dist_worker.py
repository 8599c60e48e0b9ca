"""torchrun worker for init_distributed under an elastic restart: rank 1 dies in attempt 0, the group must
re-form in attempt 1 (a fresh store prefix). Rank 0 of the last attempt writes OUT_FILE."""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from pretrain.engines import any_rank, barrier, init_distributed, shutdown

if __name__ == "__main__":
    info = init_distributed(timeout_s=60)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    agreed = [any_rank(info.rank == 1), any_rank(False)]
    if attempt == 0 and info.rank == 1:
        sys.exit(3)  # a worker failure: torchrun restarts the whole group
    barrier()
    if info.is_main:
        record = {"attempt": attempt, "world_size": dist.get_world_size(), "backend": dist.get_backend()}
        with open(sys.argv[1], "w") as f:
            json.dump({**record, "any_rank": agreed}, f)
    shutdown()
