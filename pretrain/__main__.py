"""`python -m pretrain ...` is the `pretrain` command (and what every launcher runs on each worker).

A worker of a multi-process job that has finished ends through `end_process` (pretrain/engines/dist.py),
skipping the interpreter's teardown, which occasionally aborts a finished worker.
"""

import os

from pretrain.cli import main

code = main()  # has closed the rank's own log file (PRETRAIN_RANK_LOG_DIR), if any, with the exit code
if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):
    from pretrain.engines.dist import end_process  # torch is loaded by now: the import costs nothing

    end_process(code)
raise SystemExit(code)
