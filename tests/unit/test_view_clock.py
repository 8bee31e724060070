"""How old a view of the log is counts the time a suspended host slept."""

import sys
import time

import pytest

from service.storage import database


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CLOCK_BOOTTIME is Linux's")
def test_the_views_clock_is_the_one_that_counts_sleep(monkeypatch):
    # CLOCK_MONOTONIC stops while the machine is suspended; CLOCK_BOOTTIME goes on, and a
    # view of the log must be as old as the time the log moved on without it.
    asked = []
    monkeypatch.setattr(database, "_clock_gettime", lambda clock: asked.append(clock) or 7.0)
    assert database.view_clock() == 7.0
    assert asked == [time.CLOCK_BOOTTIME]
