"""The answer to vLLM's ``has_pending_push_work``: empty steps while the workers owe reports, paced,
and not forever (:mod:`lmcache_connector.connector.idle_steps`)."""

from __future__ import annotations

from lmcache_connector.connector.idle_steps import IdleSteps


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _steps(give_up_s: float = 30.0) -> tuple[IdleSteps, FakeTime]:
    time = FakeTime()
    return IdleSteps(pause_s=0.002, max_pause_s=0.02, give_up_s=give_up_s, clock=time.clock, sleep=time.sleep), time


def test_the_engine_steps_while_reports_are_owed_and_stops_when_none_are():
    steps, time = _steps()
    assert steps.wanted(3) and steps.wanted(2)
    assert time.slept == [0.002, 0.002]  # paced: one empty step per pause, not a busy loop
    assert not steps.wanted(0)
    assert len(time.slept) == 2  # nothing owed: no pause either


def test_the_pause_grows_while_no_report_arrives_and_shrinks_when_one_does():
    steps, time = _steps()
    for _ in range(6):
        assert steps.wanted(4)
    assert time.slept == [0.002, 0.004, 0.008, 0.016, 0.02, 0.02]  # a slow store: fewer empty steps
    assert steps.wanted(3)
    assert time.slept[-1] == 0.002


def test_owed_reports_that_make_no_progress_stop_the_empty_steps():
    steps, time = _steps(give_up_s=1.0)
    assert steps.wanted(2)
    time.now += 0.9
    assert steps.wanted(2)
    time.now += 0.2  # 1.1 s with the same two reports owed
    assert not steps.wanted(2)
    assert not steps.wanted(2)


def test_progress_or_a_new_idle_period_starts_the_wait_over():
    steps, time = _steps(give_up_s=1.0)
    assert steps.wanted(2)
    time.now += 0.9
    assert steps.wanted(1)  # one report arrived
    time.now += 0.9
    assert steps.wanted(1)  # 1.8 s since the first question, 0.9 s since progress
    time.now += 0.2
    assert not steps.wanted(1)
    time.now += 5.0  # requests ran (vLLM asks only when idle): a new idle period
    assert steps.wanted(1)
