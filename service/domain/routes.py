"""Which permission an API route needs: longest-prefix rules by method, from ROUTES_FILE
or derived from the permission catalogue (`invoices:read` → GET/HEAD/OPTIONS
/api/v1/invoices…, `invoices:write` → POST/PUT/PATCH/DELETE /api/v1/invoices…). What no
rule covers is refused (SPEC §3: the gateway fails closed)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgspec

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
WHOAMI = "/api/v1/whoami"

# A prefix names a resource: whole segments of path characters, without the ".", ";" and
# "%" that the matching below reads differently from an upstream (a format, a parameter).
_PREFIX = re.compile(r"^/api(/[A-Za-z0-9_~!$&'()*+,=:@-]+)+/?\Z")


class RouteRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`public`: no permission needed; the caller still needs a valid token from an
    address on its application's allow list."""

    prefix: str
    permission: str | None = None
    methods: frozenset[str] = READ_METHODS | WRITE_METHODS
    public: bool = False


#: Tollgate's own route, served by the gateway itself: any valid token may ask who it is.
#: Every method is covered so that the gateway, not the upstream, answers 405 to a POST.
WHOAMI_RULE = RouteRule(prefix=WHOAMI, public=True)


class RoutesError(ValueError):
    pass


def resource_path(path: str) -> str:
    """The path as the rules read it: lower case, and without a format suffix on its last
    segment (`/api/v1/Invoices.json` → `/api/v1/invoices`), because frameworks like Rails
    route those to the resource itself."""
    head, _, last = path.lower().rpartition("/")
    return f"{head}/{last.partition('.')[0]}"


class RouteTable:
    def __init__(self, rules: Iterable[RouteRule]) -> None:
        self.rules = tuple(rules)
        self._prefixes = tuple((r.prefix.lower().rstrip("/"), r) for r in self.rules)
        # Per table: paths are the caller's, so the cache is bounded.
        self.rule_for = functools.lru_cache(maxsize=8192)(self._match)

    def _match(self, method: str, path: str) -> RouteRule | None:
        """The rule of the longest prefix that covers `method` and `path` (a prefix matches
        whole segments: /api/v1/invoices matches /api/v1/invoices/7, not
        /api/v1/invoicesX), or None: nothing covers it, and the request is refused."""
        key = resource_path(path)
        best: tuple[str, RouteRule] | None = None
        for prefix, rule in self._prefixes:
            if method not in rule.methods:
                continue
            if (key == prefix or key.startswith(prefix + "/")) and (
                best is None or len(prefix) > len(best[0])
            ):
                best = (prefix, rule)
        return None if best is None else best[1]


def default_rules(catalogue: Mapping[str, str]) -> tuple[RouteRule, ...]:
    rules = []
    for name in catalogue:
        resource, _, action = name.partition(":")
        methods = READ_METHODS if action == "read" else WRITE_METHODS
        rules.append(RouteRule(prefix=f"/api/v1/{resource}", permission=name, methods=methods))
    return tuple(rules)


def load_routes(path: Path | None, catalogue: Mapping[str, str]) -> RouteTable:
    if path is None:
        return RouteTable((WHOAMI_RULE, *default_rules(catalogue)))
    try:
        rules = msgspec.json.decode(path.read_bytes(), type=list[RouteRule])
    except OSError as exc:  # the reason alone: str(exc) repeats the path
        reason = exc.strerror or str(exc)
        raise RoutesError(f"ROUTES_FILE {path}: cannot read: {reason}") from exc
    except msgspec.DecodeError as exc:
        raise RoutesError(f"ROUTES_FILE {path}: {exc}") from exc
    for rule in rules:
        problem = _problem(rule, catalogue)
        if problem:
            raise RoutesError(f"ROUTES_FILE {path}: {rule.prefix!r}: {problem}")
    _refuse_overlaps(path, rules)
    return RouteTable((WHOAMI_RULE, *rules))


def _refuse_overlaps(path: Path, rules: list[RouteRule]) -> None:
    """Two rules that cover the same prefix (as the table reads it: in any case, a
    trailing "/" or not) for a method: the table would take the first and ignore the
    other, so the order of the file would decide, silently, whether a request needs a
    permission at all."""
    seen: dict[str, list[RouteRule]] = {}
    for rule in rules:
        key = rule.prefix.lower().rstrip("/")
        for other in seen.get(key, []):
            shared = sorted(rule.methods & other.methods)
            if shared:
                raise RoutesError(
                    f"ROUTES_FILE {path}: {rule.prefix!r} and {other.prefix!r} both cover "
                    f"{', '.join(shared)}: one rule per prefix and method"
                )
        seen.setdefault(key, []).append(rule)


def _problem(rule: RouteRule, catalogue: Mapping[str, str]) -> str | None:
    if not _PREFIX.match(rule.prefix):
        return "a prefix is /api/ and whole segments, without '.', ';' or '%'"
    if resource_path(rule.prefix.rstrip("/")) == WHOAMI:
        return f"{WHOAMI} is Tollgate's own route"
    unknown = sorted(rule.methods - READ_METHODS - WRITE_METHODS)
    if unknown or not rule.methods:
        return f"methods must be some of {sorted(READ_METHODS | WRITE_METHODS)}"
    if rule.public:
        return "a public rule names no permission" if rule.permission is not None else None
    if rule.permission is None:
        return 'name a permission, or declare the route "public": true'
    if rule.permission not in catalogue:
        return f"unknown permission {rule.permission!r}"
    return None
