"""Progress of long operations: a bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

Report = Callable[[str, int, int], None]


@contextlib.contextmanager
def progress_reporter() -> Iterator[Report]:
    if not sys.stderr.isatty():
        last: dict[str, int] = {}

        def plain(name: str, position: int, head: int) -> None:
            percent = 100 * position // head if head else 100
            if last.get(name) != percent // 10 or position >= head:
                last[name] = percent // 10
                print(f"{name}: {position}/{head} ({percent}%)", file=sys.stderr, flush=True)

        yield plain
        return

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, transient=False) as bar:
        tasks: dict[str, object] = {}

        def rich_report(name: str, position: int, head: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=head)
            bar.update(tasks[name], completed=position, total=head)  # type: ignore[arg-type]

        yield rich_report
