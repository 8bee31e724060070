"""The company admins' dashboard: server-rendered pages (Jinja2) to manage applications,
connections, people, admin keys, and to read the history, every change behind the
session's CSRF token."""

from __future__ import annotations

# Each page module adds its routes to the one table when imported.
from service.web.dashboard import account, applications, connections, history, overview, people
from service.web.dashboard.base import TEMPLATES, routes, templates

__all__ = [
    "TEMPLATES",
    "account",
    "applications",
    "connections",
    "history",
    "overview",
    "people",
    "routes",
    "templates",
]
