"""Bare aiohttp handlers, the baselines: `python -m tests.bench.bare json|dict PORT`.

- json: answers a small JSON body, nothing else (for the token endpoint).
- dict: hashes the Bearer token and looks it up in a dict of 100,000 hashes, then
  answers (for the gateway).
"""

from __future__ import annotations

import asyncio
import hashlib
import sys

from aiohttp import web

from service.web.server import event_loop_factory


def json_app() -> web.Application:
    async def handler(_request: web.Request) -> web.Response:
        return web.json_response({"access_token": "x" * 54, "token_type": "Bearer"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def dict_app(known: set[str]) -> web.Application:
    table = {
        hashlib.sha256(t.encode()).digest(): {"client_id": "c", "company_id": "co"} for t in known
    }

    async def handler(request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "")[7:]
        entry = table.get(hashlib.sha256(token.encode()).digest())
        if entry is None:
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response(entry)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    tokens = set(sys.argv[3:])
    filler = {f"tgat_filler{i}" for i in range(100_000)}
    app = json_app() if kind == "json" else dict_app(tokens | filler)
    # The event loop Tollgate serves on (uvloop where installed): the ratios compare the
    # handlers, not the loops.
    factory = event_loop_factory()
    loop = factory() if factory is not None else asyncio.new_event_loop()
    # reuse_port: `make bench` runs one or two of these on a port, as Tollgate's workers.
    web.run_app(
        app, host="127.0.0.1", port=port, print=None, access_log=None, reuse_port=True, loop=loop
    )
