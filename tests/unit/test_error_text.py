"""What a log line says of a failure (`error_text`)."""

from __future__ import annotations

import asyncio

from service.logs import error_text


def test_a_failure_is_told_by_its_message() -> None:
    assert error_text(ConnectionResetError(104, "Connection reset by peer")) == (
        "[Errno 104] Connection reset by peer"
    )


def test_a_failure_without_a_message_is_told_by_its_type() -> None:
    assert error_text(TimeoutError()) == "TimeoutError"
    assert error_text(asyncio.CancelledError()) == "CancelledError"
