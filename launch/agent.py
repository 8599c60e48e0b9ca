"""torchrun's agent, ending in one line of ours: `python -m launch.agent [torchrun options] -m pretrain train ...`.

When a signal stops the job (Ctrl-C, SIGTERM from a scheduler), torchrun passes it to the workers, waits for them
(they checkpoint at the next step boundary), and then dies with a `SignalException` traceback of ~25 lines under
the workers' own last line; when a worker fails (a bad input's one `error:` line, or a bug's traceback), it
ends in a `ChildFailedError` traceback and a ~20-line summary. This wrapper runs torchrun in this process and
answers each with one line and an exit code (the shell's 128 + N for signal N; the first failed worker's own
code), so the workers' message stays the last thing that matters. Only this process imports torch; `launch`
itself does not.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """torchrun with `argv`; 128 + N after signal N stopped it, the first failed worker's exit code after a
    worker failed, else what torchrun returns or raises."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(list(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = f"exited with code {code}" if code >= 0 else f"was killed by {signal.Signals(-code).name}"
        print(f"launch: the job failed: rank {rank} {how} first (its output is above)", file=sys.stderr)
        if code < 0:  # killed by a signal: the shell's code for it
            return 128 - code
        return code or 1
    except SignalException as e:
        name = e.sigval.name
        print(
            f"launch: stopped by {name}; the workers checkpoint at the next step boundary before they exit: "
            "run the same command again to resume",
            file=sys.stderr,
            flush=True,
        )
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
