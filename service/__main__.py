"""`python -m service` is the `tollgate` command."""

from __future__ import annotations

import signal
from types import FrameType

#: Ctrl-C pressed while the command's modules were first imported
_interrupted: list[int] = []


def run() -> int:
    """The command, Ctrl-C at any moment included. Pressed while its modules are first
    imported, it ends the command with 130 as soon as they are, nothing printed (raised
    inside an import statement, a KeyboardInterrupt came out as a traceback, another
    exception, or none); later, Python's KeyboardInterrupt, which the command handles."""
    ours = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    try:
        if ours:
            signal.signal(signal.SIGINT, _noted)
        from service.cli import main

        if _interrupted:
            return 130
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return main()
    except KeyboardInterrupt:
        return 130


def _noted(signum: int, _frame: FrameType | None) -> None:
    _interrupted.append(signum)


if __name__ == "__main__":
    raise SystemExit(run())
