"""pretrain.faults alone: signals really delivered to this process, agreement through a fake any_rank."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pretrain import faults
from pretrain.engines.base import StepOutput
from pretrain.faults import DivergenceError, DivergenceGuard, PreemptionHandler


@pytest.fixture
def handler():
    h = PreemptionHandler(environ={}).install()
    yield h
    h.uninstall()


def step(*, skipped: bool = False, loss: float = 1.0) -> StepOutput:
    return StepOutput(loss=loss, grad_norm=float("nan") if skipped else 1.0, lr=1e-3, skipped=skipped)


def test_no_signal_no_stop(handler):
    assert handler.received is None
    assert handler.should_stop() is False
    assert handler.requeue_requested is False


def test_signal_twice_only_sets_the_flag(handler):
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # a second delivery of the same event must not kill us
    os.kill(os.getpid(), signal.SIGUSR1)
    assert handler.received == signal.SIGTERM  # the first one is kept
    assert handler.should_stop() is True
    assert handler.should_stop() is True


def test_one_ctrl_c_delivered_twice_is_one_stop(handler):
    os.kill(os.getpid(), signal.SIGINT)  # from the terminal...
    os.kill(
        os.getpid(), signal.SIGINT
    )  # ...and again from torchrun, milliseconds later: no KeyboardInterrupt
    assert handler.received == signal.SIGINT
    assert handler.should_stop() is True
    assert handler.interrupt_agreed is True


def test_second_ctrl_c_exits_at_once(handler, monkeypatch):
    monkeypatch.setattr(faults, "REPEAT_WINDOW_S", 0.05)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs here, at the latest


def test_sigterm_is_not_an_interrupt(handler):
    os.kill(os.getpid(), signal.SIGTERM)
    assert handler.should_stop() is True
    assert handler.interrupt_agreed is False


def test_uninstall_restores_previous_handler():
    before = signal.getsignal(signal.SIGUSR1)
    h = PreemptionHandler().install()
    assert signal.getsignal(signal.SIGUSR1) != before
    h.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


class FakeRanks:
    """any_rank over simulated peers: records each call so the test sees what was agreed."""

    def __init__(self, others: list[bool]) -> None:
        self.others = others
        self.calls: list[bool] = []

    def __call__(self, flag: bool) -> bool:
        self.calls.append(flag)
        return flag or self.others.pop(0)


def test_stop_agreed_when_another_rank_got_the_signal(handler):
    ranks = FakeRanks(others=[False, True, True, False])
    assert handler.should_stop(ranks) is False  # nobody yet
    assert handler.should_stop(ranks) is True  # a peer saw the pre-timeout signal; we saw nothing
    assert ranks.calls == [False, False, False, False]  # stop, stop, then the requeue and Ctrl-C agreements
    assert handler.requeue_requested is False  # no SLURM job here
    assert handler.interrupt_agreed is False


def test_requeue_only_for_pre_timeout_signal_under_slurm():
    calls = []
    usr1 = PreemptionHandler(environ={"SLURM_JOB_ID": "42"}).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert usr1.should_stop()
        assert usr1.requeue_requested is True
        assert usr1.requeue(run=lambda cmd, **kw: calls.append(cmd)) is True
    finally:
        usr1.uninstall()
    assert calls == [["scontrol", "requeue", "42"]]

    term = PreemptionHandler(environ={"SLURM_JOB_ID": "42"}).install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert term.should_stop()
        assert term.requeue_requested is False  # SLURM decides on SIGTERM (preempt, requeue, scancel)
        assert term.requeue(run=lambda cmd, **kw: calls.append(cmd)) is False
    finally:
        term.uninstall()
    assert len(calls) == 1


def test_requeue_agreed_from_a_peer():
    h = PreemptionHandler(environ={"SLURM_JOB_ID": "7"})
    assert h.should_stop(lambda flag: True) is True  # peers: stop, and the stop was a pre-timeout one
    assert h.requeue_requested is True


def test_guard_budget_counts_and_stops():
    guard = DivergenceGuard(max_skips=2)
    guard.observe(step())
    guard.observe(step(skipped=True, loss=float("nan")), step=3)
    guard.observe(step())
    guard.observe(step(skipped=True, loss=float("inf")), step=5)
    assert guard.skips == 2
    with pytest.raises(DivergenceError, match=r"step 9: 3 steps skipped .* budget of 2"):
        guard.observe(step(skipped=True, loss=float("nan")), step=9)


def test_guard_zero_budget_and_unskipped_nan():
    with pytest.raises(DivergenceError, match="1 steps skipped"):
        DivergenceGuard(max_skips=0).observe(step(skipped=True))
    with pytest.raises(DivergenceError, match="applied the update"):
        DivergenceGuard(max_skips=5).observe(step(loss=float("nan")))
    with pytest.raises(ValueError, match="max_skips"):
        DivergenceGuard(max_skips=-1)


def test_guard_budget_spans_a_restart():
    guard = DivergenceGuard(max_skips=1)
    guard.observe(step(skipped=True))
    resumed = DivergenceGuard(max_skips=1, skips=guard.skips)  # as the loop restores trainer_state.json
    with pytest.raises(DivergenceError):
        resumed.observe(step(skipped=True))
