"""`python -m service` is the `tollgate` command."""

from __future__ import annotations


def run() -> int:
    """The command, Ctrl-C at any moment included: one pressed while the command is still
    being imported (the first fraction of a second) ends it with 130 and no traceback, as
    one pressed later does."""
    try:
        from service.cli import main

        return main()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(run())
