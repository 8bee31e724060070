"""A TCP proxy on loopback that can stop forwarding: a database stalled as a frozen server
or a partition shows it (connections are accepted, bytes go nowhere, nothing answers),
without freezing the PostgreSQL the other tests share."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import parse_qs, urlsplit, urlunsplit


class StallProxy:
    """Listens on 127.0.0.1 and forwards to the server of `dsn` (TCP or a Unix socket)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        parts = urlsplit(dsn)
        socket_dir = parse_qs(parts.query).get("host", [""])[0]
        port = parts.port or 5432
        if socket_dir.startswith("/"):
            self._unix: str | None = f"{socket_dir}/.s.PGSQL.{port}"
        else:
            self._unix = None
        self.target = (parts.hostname or "127.0.0.1", port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        #: stall() once a client sends these bytes (stall_on)
        self._marker: bytes | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._clients: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> StallProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def proxied_dsn(self) -> str:
        """`dsn`, through this proxy."""
        parts = urlsplit(self.dsn)
        user = parts.username or "postgres"
        netloc = f"{user}@127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def stall_on(self, marker: bytes) -> None:
        """Stalls, as stall() does, as soon as a client sends `marker` (a statement's text,
        say): the server never hears it, and nothing answers."""
        self._marker = marker

    def cut(self) -> None:
        """Resets the connections open now, as a network that fails does: each client
        sees its connection reset at once, while the server's session runs on until it
        next reads from or writes to its own (a statement waiting for a lock, say, goes on
        waiting, and commits)."""
        clients, self._clients = self._clients, []
        for writer in clients:
            writer.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for writer in self._writers:
            writer.transport.abort()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        self._clients.append(writer)
        try:
            if self._unix is not None:
                up_reader, up_writer = await asyncio.open_unix_connection(self._unix)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.append(up_writer)
        for source, sink, upstream in ((reader, up_writer, True), (up_reader, writer, False)):
            task = asyncio.create_task(self._pump(source, sink, upstream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, upstream: bool
    ) -> None:
        try:
            while data := await source.read(65536):
                if upstream and self._marker is not None and self._marker in data:
                    self.flowing.clear()
                await self.flowing.wait()  # stalled: held here, as a frozen server holds it
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.transport.abort()
