"""Progress of long operations, with the time left: a bar on a terminal, plain lines
otherwise. Both go to stderr, so that stdout carries only the command's JSON."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

Report = Callable[[str, int, int], None]


@contextlib.contextmanager
def progress_reporter() -> Iterator[Report]:
    if not sys.stderr.isatty():
        yield _plain()
        return

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    # stdout stays the command's own (its JSON), never redirected into the bar
    bar = Progress(*columns, console=Console(stderr=True), redirect_stdout=False)
    with bar:
        tasks: dict[str, object] = {}

        def rich_report(name: str, position: int, head: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=head)
            bar.update(tasks[name], completed=position, total=head)  # type: ignore[arg-type]

        yield rich_report


def _plain() -> Report:
    """A line at every tenth of the way, with the time left at the rate so far."""
    last: dict[str, int] = {}
    started: dict[str, tuple[float, int]] = {}

    def plain(name: str, position: int, head: int) -> None:
        now = time.monotonic()
        since, first = started.setdefault(name, (now, position))
        percent = 100 * position // head if head else 100
        tenth = percent // 10 if position < head else 11  # the end, said once
        if last.get(name) == tenth:
            return
        last[name] = tenth
        line = f"{name}: {position}/{head} ({percent}%"
        if position < head and position > first and now > since:
            left = (head - position) * (now - since) / (position - first)
            line += f", about {_duration(left)} left"
        print(line + ")", file=sys.stderr, flush=True)

    return plain


def _duration(seconds: float) -> str:
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"
