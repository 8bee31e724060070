"""Which permission an API route needs: longest-prefix rules by method, from ROUTES_FILE
or derived from the permission catalogue (`invoices:read` → GET/HEAD /api/v1/invoices…,
`invoices:write` → POST/PUT/PATCH/DELETE /api/v1/invoices…)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class RouteRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    prefix: str
    permission: str
    methods: frozenset[str] = READ_METHODS | WRITE_METHODS


class RoutesError(ValueError):
    pass


@dataclass(frozen=True)
class RouteTable:
    rules: tuple[RouteRule, ...]

    def permission_for(self, method: str, path: str) -> str | None:
        return _permission_for(self, method, path)

    def match(self, method: str, path: str) -> str | None:
        """The permission of the longest matching prefix (a prefix matches whole path
        segments: /api/v1/invoices matches /api/v1/invoices/7, not /api/v1/invoicesX)."""
        best: RouteRule | None = None
        for rule in self.rules:
            if method not in rule.methods:
                continue
            prefix = rule.prefix.rstrip("/")
            matches = path == prefix or path.startswith(prefix + "/")
            if matches and (best is None or len(prefix) > len(best.prefix.rstrip("/"))):
                best = rule
        return None if best is None else best.permission


@functools.lru_cache(maxsize=8192)
def _permission_for(table: RouteTable, method: str, path: str) -> str | None:
    return table.match(method, path)


def default_rules(catalogue: Mapping[str, str]) -> tuple[RouteRule, ...]:
    rules = []
    for name in catalogue:
        resource, _, action = name.partition(":")
        methods = READ_METHODS if action == "read" else WRITE_METHODS
        rules.append(RouteRule(prefix=f"/api/v1/{resource}", permission=name, methods=methods))
    return tuple(rules)


def load_routes(path: Path | None, catalogue: Mapping[str, str]) -> RouteTable:
    if path is None:
        return RouteTable(default_rules(catalogue))
    try:
        rules: Sequence[RouteRule] = msgspec.json.decode(path.read_bytes(), type=list[RouteRule])
    except (OSError, msgspec.DecodeError) as exc:
        raise RoutesError(f"ROUTES_FILE {path}: {exc}") from exc
    unknown = [r.permission for r in rules if r.permission not in catalogue]
    if unknown:
        raise RoutesError(f"ROUTES_FILE {path}: unknown permissions {unknown[:3]}")
    return RouteTable(tuple(rules))
