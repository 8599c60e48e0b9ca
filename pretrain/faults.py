"""Stopping a run cleanly: preemption signals and divergence.

A cluster stops jobs with signals (SIGTERM on preemption or `scontrol requeue`, SIGUSR1 shortly before the time
limit when the job asks for `--signal=B:USR1@N`). Dying inside a signal handler can leave a half-written
checkpoint, and ranks that stop at different steps deadlock in the next collective. So the handler only sets a
flag; the loop asks `should_stop(any_rank)` at each step boundary, where every rank agrees, saves a checkpoint
and exits. After a pre-timeout signal nobody else will requeue the job, so rank 0 does it itself (`requeue()`).
Ctrl-C (SIGINT) stops the same way; a second Ctrl-C exits at once. A terminal sends SIGINT to the whole process
group and torchrun passes it on to its workers as well, so one Ctrl-C can arrive twice within milliseconds:
only a SIGINT more than `REPEAT_WINDOW_S` after the first counts as the second.

A NaN/inf loss or gradient makes the engine skip the update on every rank (StepOutput.skipped); the
`DivergenceGuard` counts those skips and stops the run with a clear message once the budget is spent, before a
diverged model could overwrite the last good checkpoint.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING

from pretrain.errors import DivergenceError

if TYPE_CHECKING:
    from pretrain.engines.base import StepOutput

AnyRank = Callable[[bool], bool]
"""True on every rank when the flag is True on any rank (e.g. `pretrain.engines.any_rank`)."""


REPEAT_WINDOW_S = 1.0


def _local(flag: bool) -> bool:
    return flag


class PreemptionHandler:
    """Turns SIGTERM/SIGUSR1/SIGINT into a flag that all ranks agree on at the next step boundary.

    The handler is safe to receive any number of times (SLURM and torchrun may both deliver the same event), and
    does no I/O, so a signal during a checkpoint write cannot corrupt it. The one exception is a second Ctrl-C,
    which raises KeyboardInterrupt: the user asked to stop now, and `latest` still names a complete checkpoint.
    """

    def __init__(
        self,
        signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT),
        *,
        requeue_signal: signal.Signals = signal.SIGUSR1,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.signals = tuple(signals)
        self.requeue_signal = requeue_signal
        self._environ = os.environ if environ is None else environ
        self._previous: dict[signal.Signals, object] = {}
        self._received: signal.Signals | None = None
        self._requeue_signal_seen = False
        self._agreed_requeue = False
        self._first_interrupt: float | None = None
        self._agreed_interrupt = False

    def install(self) -> PreemptionHandler:
        """Install the handlers (main thread only); returns self so `h = PreemptionHandler().install()` reads well."""
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before `install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGINT:
            now = time.monotonic()
            if self._first_interrupt is None:
                self._first_interrupt = now
            elif now - self._first_interrupt > REPEAT_WINDOW_S:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        if self._received is None:
            self._received = sig
        if sig == self.requeue_signal:
            self._requeue_signal_seen = True

    @property
    def received(self) -> signal.Signals | None:
        """The first signal this process got, or None."""
        return self._received

    def should_stop(self, any_rank: AnyRank = _local) -> bool:
        """Collective when `any_rank` is: call it on every rank at every step boundary.

        True on all ranks once any rank got a signal. When stopping, whether the job must requeue itself, and
        whether it was Ctrl-C, are agreed too, so rank 0 knows even if only another node saw the signal.
        """
        if not any_rank(self._received is not None):
            return False
        self._agreed_requeue = any_rank(self._requeue_signal_seen)
        self._agreed_interrupt = any_rank(self.interrupted)
        return True

    @property
    def interrupted(self) -> bool:
        """Ctrl-C (SIGINT) reached this process."""
        return self._first_interrupt is not None

    @property
    def interrupt_agreed(self) -> bool:
        """After `should_stop` said True: some rank got Ctrl-C, so every rank ends as interrupted."""
        return self._agreed_interrupt or self.interrupted

    @property
    def slurm_job_id(self) -> str | None:
        return self._environ.get("SLURM_JOB_ID")

    @property
    def requeue_requested(self) -> bool:
        """The stop came from the pre-timeout signal inside a SLURM job: the job must requeue itself.

        On SIGTERM (preemption, `scontrol requeue`, `scancel`) SLURM decides; requeueing then would undo a cancel.
        """
        seen = self._agreed_requeue or self._requeue_signal_seen
        return seen and self.slurm_job_id is not None

    def requeue(self, run: Callable[..., object] = subprocess.run) -> bool:
        """After the checkpoint, on rank 0: `scontrol requeue $SLURM_JOB_ID` if requested. True if it did."""
        if not self.requeue_requested:
            return False
        run(["scontrol", "requeue", str(self.slurm_job_id)], check=True, timeout=60)
        return True


class DivergenceGuard:
    """Counts skipped (non-finite) steps and stops the run once more than `max_skips` happened."""

    def __init__(self, max_skips: int, *, skips: int = 0) -> None:
        """`skips` already spent (restored from trainer_state.json, so the budget spans restarts)."""
        if max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {max_skips}")
        self.max_skips = max_skips
        self.skips = skips

    def observe(self, output: StepOutput, *, step: int | None = None) -> None:
        """Feed every StepOutput (already agreed across ranks); raises DivergenceError when the budget is spent."""
        where = f"step {step}: " if step is not None else ""
        if not output.skipped and not math.isfinite(output.loss):
            raise DivergenceError(
                f"{where}loss is {output.loss} but the engine applied the update; stopping so the last "
                "checkpoint stays good"
            )
        if not output.skipped:
            return
        self.skips += 1
        if self.skips > self.max_skips:
            raise DivergenceError(
                f"{where}{self.skips} steps skipped for a non-finite loss or gradient (loss={output.loss}, "
                f"grad_norm={output.grad_norm}), more than the budget of {self.max_skips}; stopping. "
                "The last checkpoint on disk was written before the divergence: lower train.lr, check the "
                "data, or raise train.max_skips, then resume."
            )
