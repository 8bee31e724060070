"""structlog, configured once: JSON lines in production, readable lines on a terminal."""

from __future__ import annotations

import logging
import sys

import msgspec
import structlog

_encoder = msgspec.json.Encoder(enc_hook=str)


def _json(event: object, **_: object) -> str:
    # A log line per request: msgspec writes it several times faster than json.dumps.
    return _encoder.encode(event).decode()


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    renderer: structlog.typing.Processor
    if fmt == "console":
        # Plain tracebacks: the rich ones print local variables, which may hold a
        # request's secrets.
        renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_json)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        # Configured once per process (tests leave it unconfigured, for capture_logs).
        cache_logger_on_first_use=True,
    )
