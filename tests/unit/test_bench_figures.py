"""The bench's HTTP figures: each the median of several wrk windows, shown with their range,
and each ratio the median of ratios paired round by round, so that one slow or fast minute
on a shared machine does not decide a ratio."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

from tests.bench.eventlog_bench import median_pair
from tests.bench.http_bench import Figure, Ratio, Readiness, median, row
from tests.bench.load import Result
from tests.bench.wrk import CpuMeter


def window(requests: int, p99: float, server_cpu: float) -> Figure:
    result = Result(requests, 0, 10.0, p99 / 2, p99)
    return Figure(result, {"server": server_cpu, "postgres": 0.4, "wrk": 0.1}, (result.rate,),
                  requests)  # fmt: skip


def test_the_median_window_is_reported_whole_with_the_range_of_all():
    slow, middle, fast = (
        window(50_000, 30.0, 0.9),
        window(60_000, 20.0, 1.0),
        window(90_000, 9.0, 1.1),
    )
    figure = median([fast, slow, middle])
    assert figure.result is middle.result and figure.cpu is middle.cpu  # not a blend
    assert sorted(figure.rates) == [5_000.0, 6_000.0, 9_000.0]
    assert figure.answered == 200_000  # every window's answers, for the committed check
    line = row("POST /oauth/token", 1, figure, Ratio((0.25, 0.2, 0.3)))
    assert "| 6,000 | 5,000-9,000 |" in line
    assert "| 25% (20-30%) |" in line  # the median round's ratio, and the range
    assert "| 100% | 40% | 10% |" in line
    assert "| 0 | 100% | 100% | 40% | 10% |" in row("bare aiohttp handler", 1, figure)


def test_what_readyz_said_counts_every_window_and_its_worst_lag():
    calm = dataclasses.replace(window(60_000, 20.0, 1.0), readiness=Readiness(98, 0, 640, 0.09))
    busy = dataclasses.replace(window(90_000, 9.0, 1.1), readiness=Readiness(101, 3, 1312, 0.2))
    figure = median([calm, busy, window(50_000, 30.0, 0.9)])
    assert figure.readiness == Readiness(199, 3, 1312, 0.2)


def test_a_ratio_pairs_the_windows_of_each_round_not_the_medians():
    # The machine was fast in the first round and slow in the second: each round's pair
    # says 50%; the medians of the two servers' windows, taken apart, would say 80%.
    ours = [window(n, 10.0, 1.0) for n in (100_000, 40_000, 45_000)]
    bare = [window(n, 5.0, 1.0) for n in (200_000, 80_000, 56_250)]
    ratio = Ratio.of(ours, bare)
    assert ratio.rounds == (0.5, 0.5, 0.8)
    assert ratio.value == 0.5
    assert median(ours).rate / median(bare).rate == 0.5625  # what the medians would say
    assert ratio.times() == "0.50x (0.50-0.80x)"


def test_an_even_number_of_windows_reports_the_upper_middle_one():
    figures = [window(n, 10.0, 1.0) for n in (40_000, 70_000, 50_000, 60_000)]
    assert median(figures).rate == 6_000.0


def test_the_appends_figure_is_the_median_rounds_pair():
    # (event log, pgbench) per round: the middle ratio is 2.0, from the second round.
    pairs = [(30_000.0, 10_000.0), (16_000.0, 8_000.0), (9_000.0, 6_000.0)]
    assert median_pair(pairs) == (16_000.0, 8_000.0, "2.00x (1.50-3.00x)")
    # Without pgbench there is no ratio: the median rate of the log alone.
    assert median_pair([(3.0, None), (1.0, None), (2.0, None)]) == (2.0, None, "n/a")


def test_the_cpu_of_a_backend_that_exits_within_the_window_is_counted():
    """A "postmaster" that starts a child, which burns about 0.3 s of CPU and exits, and
    reaps it, all within the window: the child's time counts for PostgreSQL."""
    burn = "import time; t = time.process_time(); exec('while time.process_time() - t < 0.3: pass')"
    postmaster = subprocess.Popen([
        sys.executable, "-c",
        f"import subprocess, sys, time; time.sleep(0.3); "
        f"subprocess.run([sys.executable, '-c', {burn!r}]); time.sleep(30)",
    ])  # fmt: skip
    try:
        with CpuMeter(postmaster.pid) as meter:
            time.sleep(2.0)
    finally:
        postmaster.kill()
        postmaster.wait()
    share = meter.shares["postgres"]
    assert share is not None and share >= 0.3 / 2.0 * 0.8, share
