"""The fault suite (`-m faults`): real `tollgate serve` processes on their own embedded
PostgreSQL, faults injected under load; each test's figures are printed at the end."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

_FIGURES: list[tuple[str, dict[str, Any]]] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.path):
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.timeout(240))


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """What a fault test saw (writes acknowledged and found, emails, longest answer)."""
    seen: dict[str, Any] = {}
    yield seen
    _FIGURES.append((request.node.name, seen))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FIGURES:
        terminalreporter.section("fault figures")
        for name, seen in _FIGURES:
            terminalreporter.write_line(f"{name}: {seen}")
