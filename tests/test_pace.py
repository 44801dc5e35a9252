"""When the gateway commits (``streampipe.ingest.pace``): at once while it keeps up,
gathered near its limit, and back to at once when the load falls."""

from __future__ import annotations

import pytest

from streampipe.ingest.pace import Pace


def drive(pace: Pace, seconds: float, rate: float, cost_at_once: float, cost_gathered: float):
    """Feed ``pace`` windows of a load of ``rate`` messages/s that costs the gateway
    ``cost_*`` seconds a message; the gather times it chose, one per 50 ms step."""
    chosen = []
    for _ in range(int(seconds / 0.05)):
        cost = cost_gathered if pace.busy else cost_at_once
        handled = min(rate, 1 / cost) * 0.05
        drive.messages += handled
        drive.waited += 0.05 * max(0.0, 1 - handled * cost / 0.05)
        drive.now += 0.05
        chosen.append(pace.update(drive.now, drive.waited, int(drive.messages)))
    return chosen


@pytest.fixture(autouse=True)
def clock():
    drive.now, drive.waited, drive.messages = 0.0, 0.0, 0.0


def test_a_load_it_keeps_up_with_is_committed_at_once():
    pace = Pace(0.1)
    assert set(drive(pace, 5, rate=2_000, cost_at_once=200e-6, cost_gathered=80e-6)) == {0.0}


def test_near_its_limit_it_gathers_and_goes_on_gathering():
    pace = Pace(0.1)
    chosen = drive(pace, 5, rate=8_000, cost_at_once=150e-6, cost_gathered=90e-6)
    assert chosen[-60:] == [0.1] * 60  # gathering keeps it at 72 %: no flapping back


def test_when_the_load_falls_it_commits_at_once_again():
    pace = Pace(0.1)
    drive(pace, 2, rate=8_000, cost_at_once=150e-6, cost_gathered=90e-6)
    assert pace.busy
    chosen = drive(pace, 2, rate=2_000, cost_at_once=150e-6, cost_gathered=90e-6)
    assert chosen[-20:] == [0.0] * 20


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match="leave < enter"):
        Pace(0.1, enter=0.5, leave=0.6)
