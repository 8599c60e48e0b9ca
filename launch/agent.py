"""torchrun's agent, ending in one line of ours: `python -m launch.agent [torchrun options] -m pretrain train ...`.

When a signal stops the job (Ctrl-C, SIGTERM from a scheduler), torchrun passes it to the workers, waits for them
(they checkpoint at the next step boundary), and then dies with a `SignalException` traceback of ~25 lines under
the workers' own last line. This wrapper runs torchrun in this process and answers that exception with one line
and the shell's exit code for the signal (128 + N), so the workers' message stays the last thing that matters.
Only this process imports torch; `launch` itself does not.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """torchrun with `argv`; 128 + N after signal N stopped it, else what torchrun returns or raises."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun(list(sys.argv[1:] if argv is None else argv))
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
