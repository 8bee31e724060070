"""Progress as plain lines (stderr not a terminal): a line a tenth of the way, with the
time left, and the end said once."""

from __future__ import annotations

import itertools

from service import progress


def test_plain_lines_say_each_tenth_once_and_the_end_once(monkeypatch, capsys):
    clock = itertools.count(start=100.0, step=0.5)
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    report = progress._plain()
    for position in (0, 5, 10, 15, 20, 100, 100):  # the end reported again, as rebuilds do
        report("tokens", position, 100)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "tokens: 0/100 (0%)",
        "tokens: 10/100 (10%, about 9 s left)",
        "tokens: 20/100 (20%, about 8 s left)",
        "tokens: 100/100 (100%)",
    ]
