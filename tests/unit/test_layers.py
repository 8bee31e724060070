"""The layers stay where they were put: a test that reads every module's imports and fails
when one reaches across a line it must not cross.

- `service.domain` decides and does nothing else: it imports only itself, the event
  catalogue and the error modules (and no I/O library).
- The protocol core (`service.oauth`) depends on ports, not on storage or the web: no
  projections, no asyncpg, no aiohttp.
- `projections` builds read models from the log: no web, protocol or command code.
- Only the composition layer (the modules that wire the service together, and the web,
  audit and notification code that reads the read models) imports them; the domain, the
  protocol core, the event log and the command handlers reach them through ports or the
  context.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "projections")
IO_LIBRARIES = ("asyncpg", "aiohttp", "aiosmtplib", "socket", "subprocess", "requests")
ERRORS = ("service.errors", "service.oauth.errors")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(path: Path, name: str) -> set[str]:
    """Every module an import statement names, at any depth (a function-level import
    crosses a layer all the same)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


ALL = modules()


def within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def imports(name: str) -> set[str]:
    return imports_of(ALL[name], name)


def internal(imported: set[str]) -> set[str]:
    """The project's own modules among `imported` (the bare packages hold nothing)."""
    return {i for i in imported if i in ALL and i not in PACKAGES}


@pytest.mark.parametrize("name", sorted(n for n in ALL if within(n, "service.domain")))
def test_the_domain_imports_only_itself_events_and_errors(name):
    imported = imports(name)
    crossing = {
        i for i in internal(imported)
        if not within(i, "service.domain", "service.events", *ERRORS)
    }  # fmt: skip
    io = {i for i in imported if within(i, *IO_LIBRARIES)}
    assert not crossing and not io, f"{name} imports {sorted(crossing | io)}"


@pytest.mark.parametrize("name", sorted(n for n in ALL if within(n, "service.oauth")))
def test_the_protocol_core_imports_no_storage_read_models_or_web(name):
    imported = imports(name)
    crossing = {
        i for i in imported if within(i, "projections", "asyncpg", "aiohttp", "service.web")
    }
    assert not crossing, f"{name} imports {sorted(crossing)}"


@pytest.mark.parametrize("name", sorted(n for n in ALL if within(n, "projections")))
def test_projections_import_no_web_protocol_or_command_code(name):
    crossing = {
        i for i in internal(imports(name))
        if within(i, "service.web", "service.oauth", "service.commands", "service.app")
    }  # fmt: skip
    assert not crossing, f"{name} imports {sorted(crossing)}"


#: The modules that wire the service together, and so may name the read models.
COMPOSITION = (
    "service.app",
    "service.adapters",
    "service.context",
    "service.runtime",
    "service.cli",
    "service.audit",
    "service.notification",
    "service.web",
)


@pytest.mark.parametrize(
    "name", sorted(n for n in ALL if within(n, "service") and not within(n, *COMPOSITION))
)
def test_only_the_composition_layer_imports_read_models(name):
    crossing = {i for i in internal(imports(name)) if within(i, "projections")}
    assert not crossing, f"{name} imports {sorted(crossing)}"


def test_the_walk_sees_the_whole_tree():
    """A layer test that silently checked nothing would pass for ever."""
    assert len(ALL) > 60
    assert "service.domain.grants" in ALL and "projections.memory" in ALL
    assert "service.domain.state" in imports("service.domain.grants")
