"""structlog, configured once: JSON lines in production, readable lines on a terminal;
stdlib logging (aiohttp, asyncio, warnings) routed through the same processors, and
credentials redacted from every event before it is rendered."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import functools
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import IO, Any

import msgspec
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_encoder = msgspec.json.Encoder(enc_hook=str)

REDACTED = "[redacted]"

# Fields that hold a credential whatever their value looks like.
_SECRET_KEYS = frozenset(
    {
        "access_token",
        "admin_key",
        "authorization",
        "client_secret",
        "code",
        "code_verifier",
        "cookie",
        "password",
        "refresh_token",
        "secret",
        "token",
    }
)
_PARAMS = r"client_secret|password|code|code_verifier|refresh_token|access_token|token"
# What a request can carry that must not be read back from a log line: aiohttp's parser
# errors quote the offending header or request line, and an exception's text may quote a
# value. A scheme's parameters (`Bearer realm="…"`) are not credentials and stay.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(tgat|tgrt|tgac|tgadm|tgrs)_[A-Za-z0-9_\-]+"), rf"\1_{REDACTED}"),
    (
        re.compile(
            r"(?i)\b(bearer|basic)(\s+|%20|\+)(?!(?:realm|error|scope|charset)=)[^\s\"',;&]+"
        ),
        rf"\1\2{REDACTED}",
    ),
    (re.compile(rf"(?i)\b({_PARAMS})(=|%3D)[^&\s\"',;]*"), rf"\1\2{REDACTED}"),
    (re.compile(rf"(?i)([\"']?\b(?:{_PARAMS})[\"']?\s*:\s*[\"'])[^\"']*"), rf"\1{REDACTED}"),
    (re.compile(r"(?i)\b((?:set-)?cookie\s*[:=]\s*)[^\r\n\"']+"), rf"\1{REDACTED}"),
    (re.compile(r"(?i)\b(tg_[a-z_]+=)[^;\s\"',]+"), rf"\1{REDACTED}"),
)
# One cheap look decides whether a string needs the patterns at all (most do not).
_SUSPECT = re.compile(
    rf"(?i)tgat_|tgrt_|tgac_|tgadm_|tgrs_|bearer|basic|cookie|tg_|{_PARAMS}",
)


def _suspect(text: str) -> bool:
    """Whether `text` may hold what the patterns redact. For ASCII text (nearly every
    value: paths, addresses, ids, times) substring tests for what every alternative of
    _SUSPECT contains, in lower case, find whatever _SUSPECT would, at a fraction of a
    case-insensitive regex search: this runs on every field of every line."""
    if not text.isascii():
        return _SUSPECT.search(text) is not None  # case folding beyond ASCII: the regex
    low = text.lower()
    return (
        "tg" in low  # tgat_ tgrt_ tgac_ tgadm_ tgrs_ tg_
        or "token" in low  # token refresh_token access_token
        or "code" in low  # code code_verifier
        or "basic" in low
        or "bearer" in low
        or "cookie" in low
        or "secret" in low  # client_secret
        or "password" in low
    )


def error_text(exc: BaseException) -> str:
    """What a log line says of a failure: its message, or its type when it has none (a
    timeout's message is empty, and `"error": ""` tells an operator nothing)."""
    return str(exc) or type(exc).__name__


def redact_text(text: str) -> str:
    if not _suspect(text):
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {k: REDACTED if k in _SECRET_KEYS else _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    # Anything else is rendered with str() later: redact what that would print.
    return redact_text(str(value))


def redact(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    """Every field of every event, the formatted exception included."""
    for key, value in event.items():
        if key in _SECRET_KEYS:
            event[key] = REDACTED
        elif not key.startswith("_"):  # ProcessorFormatter's own record, removed later
            event[key] = _redact_value(value)
    return event


# --- the request line ---------------------------------------------------------------
# One line per request is the one log event every request writes; through structlog's
# processors it cost about as much as the gateway's whole decision. With the production
# renderer configured, it is written here directly: the same fields in the same order,
# the same redaction, the same timestamp, written under structlog's own lock a few lines
# to a write (_LineBuffer).


class _RequestLine(msgspec.Struct):
    method: str
    path: str
    status: int
    ms: float
    ip: str
    event: str
    request_id: str
    level: str
    timestamp: str


_REQUEST_EVENT = "http.request"
#: set by configure_logging when request lines are JSON at level info or below
_request_writer: structlog.WriteLogger | None = None
_line_encoder = msgspec.json.Encoder()


def _timestamp() -> str:
    """Now, as TimeStamper(fmt="iso", utc=True) writes it but always with microseconds:
    the date and time of day are formatted once a second, not once a line."""
    global _second, _second_text
    now = time.time()
    second = int(now)
    if second != _second:
        _second = second
        _second_text = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_second_text}.{int((now - second) * 1_000_000):06d}Z"


_second = -1
_second_text = ""

#: at most this many bytes a write: one write(2) to a pipe is never interleaved with
#: another process's (--workers share stderr) up to PIPE_BUF, which POSIX sets at 512 or
#: more and Linux at 4096
_WRITE_AT_MOST = getattr(os, "PIPE_BUF", 512)


class _LineBuffer:
    """Request lines gathered during a turn of the event loop, then built, encoded and
    written together before the loop next waits for I/O (and at exit): one encoder call
    and a few writes a turn rather than per request, and the same timestamp for the lines
    of one turn. A write holds whole lines only and at most PIPE_BUF bytes (a longer line
    goes alone), so processes sharing stderr never interleave inside a line."""

    def __init__(self) -> None:
        self._writer: structlog.WriteLogger | None = None
        self._pending: list[_Fields] = []
        atexit.register(self.flush)
        # A forked worker must not write the lines its parent has yet to write.
        os.register_at_fork(after_in_child=self._pending.clear)

    def use(self, writer: structlog.WriteLogger | None) -> None:
        self.flush()
        self._writer = writer

    def add(self, fields: _Fields) -> None:
        pending = self._pending
        pending.append(fields)
        if len(pending) > 1:
            return
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop (a command, a test): at once
            self.flush()

    def flush(self) -> None:
        pending, writer = self._pending, self._writer
        if not pending or writer is None:
            pending.clear()
            return
        batch = pending[:]
        pending.clear()
        now = _timestamp()
        data = _line_encoder.encode_lines(
            [
                _RequestLine(
                    _redacted(method), _redacted(path), status, ms, _redacted(ip),
                    _REQUEST_EVENT, redact_text(request_id), "info", now,
                )
                for method, path, status, ms, ip, request_id in batch
            ]
        )  # fmt: skip
        for chunk in _chunks(data, _WRITE_AT_MOST):
            writer.msg(chunk[:-1].decode())  # msg adds the newline back, and flushes


_Fields = tuple[str, str, int, float, str, str]  # method, path, status, ms, ip, request id


def _chunks(data: bytes, most: int) -> Iterator[bytes]:
    """`data` (lines, each ending with a newline) in pieces of whole lines, each at most
    `most` bytes unless a single line is longer."""
    start, end = 0, len(data)
    while start < end:
        if end - start <= most:
            yield data[start:]
            return
        cut = data.rfind(b"\n", start, start + most) + 1
        if cut <= start:  # one line longer than `most`: alone
            cut = data.index(b"\n", start) + 1
        yield data[start:cut]
        start = cut


_lines = _LineBuffer()
# What redaction made of the few methods, paths and addresses that come back (a method is
# any token, a path anything the client sends): kept, within a bound.
_redacted = functools.lru_cache(maxsize=4096)(redact_text)


def request_line(method: str, path: str, status: int, ms: float, ip: str, request_id: str) -> None:
    """The one line for a request (never its query string: it may carry codes or state)."""
    if _request_writer is None:  # a terminal, another level, or not configured (tests capture)
        structlog.get_logger("service.web.middleware").info(
            _REQUEST_EVENT, method=method, path=path, status=status, ms=ms, ip=ip
        )
        return
    _lines.add((method, path, status, ms, ip, request_id))


#: the id of the request being answered, set by the web layer for each request: every
#: event logged while answering it carries it (one ContextVar set, nothing to clear)
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tollgate_request_id", default=None
)


def _with_request_id(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    found = request_id.get()
    if found is not None:
        event.setdefault("request_id", found)
    return event


def _one_line(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    """A terminal line per event: the traceback becomes a field (the console renderer
    writes field values with repr, line breaks escaped) rather than lines of its own, and
    the message, written as it is, has its line breaks escaped."""
    if "exception" in event:
        event["traceback"] = event.pop("exception")
    message = event.get("event")
    if isinstance(message, str):
        event["event"] = message.rstrip().replace("\r", "\\r").replace("\n", "\\n")
    return event


def _json(event: object, **_: object) -> str:
    # A log line per request: msgspec writes it several times faster than json.dumps.
    return _encoder.encode(event).decode()


def _renderer(fmt: str) -> list[Processor]:
    if fmt == "console":
        return [_one_line, structlog.dev.ConsoleRenderer()]
    return [structlog.processors.JSONRenderer(serializer=_json)]


class _Stderr:
    """stderr, whose lines are dropped once it is gone (a closed terminal gives EIO, a
    reader that exited EPIPE): a line that cannot be written must not stop the code that
    writes it, a stop on SIGTERM or SIGHUP among it."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):  # ValueError: closed
            return 0

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _with_request_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # The traceback is formatted first, so that redaction sees its text too.
    tail: list[Processor] = [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact,
        *_renderer(fmt),
    ]
    structlog.configure(
        processors=[*shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line (message and newline together): processes sharing stderr
        # (--workers) never interleave inside a line, as print() with two writes could.
        logger_factory=structlog.WriteLoggerFactory(_Stderr(sys.stderr)),  # type: ignore[arg-type]
        # Configured once per process (tests leave it unconfigured, for capture_logs).
        cache_logger_on_first_use=True,
    )
    _route_stdlib(shared, tail, numeric)
    global _request_writer
    _request_writer = (
        structlog.WriteLogger(_Stderr(sys.stderr))  # type: ignore[arg-type]
        if fmt != "console" and numeric <= logging.INFO
        else None
    )
    _lines.use(_request_writer)


def _route_stdlib(shared: list[Processor], tail: list[Processor], level: int) -> None:
    """aiohttp, asyncio and every other library log through stdlib `logging`: their
    records get the same fields, redaction and rendering as the service's own events."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    handler = logging.StreamHandler(_Stderr(sys.stderr))
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Python's warnings print the source line under the message: one event instead.
    logging.captureWarnings(True)
