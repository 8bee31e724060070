"""Two service instances on one database (two processes' worth of read models), and
signed-in users: shared by the user lifecycle, consent and kill-switch tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from service.app import CONTEXT, create_app
from service.settings import Settings
from service.storage.database import Database


@asynccontextmanager
async def second_instance(db, tmp_path: Path) -> AsyncIterator[TestClient]:
    """Another instance of the service on the same database, with read models of its own:
    what another `tollgate serve` process would be (the SQL projections stay with the
    first one)."""
    settings = Settings(data_dir=tmp_path / "second", log_format="json", run_projections=False)
    app = create_app(settings, database=Database(db.dsn, db.pool))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


def freeze(client: TestClient) -> None:
    """This instance stops following the log: it sees what others write only when a lookup
    misses. A process that lags behind, made to lag for as long as the test needs."""
    feed = client.app[CONTEXT].feed
    assert feed._task is not None
    feed._task.cancel()


@dataclass
class Signed:
    user_id: str
    cookie: str
    csrf: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Cookie": f"tg_session={self.cookie}"}

    @property
    def change(self) -> dict[str, str]:
        return self.headers | {"X-CSRF-Token": self.csrf}


async def sign_in(client: TestClient, email: str, password: str) -> Signed:
    response = await client.post("/session", json={"email": email, "password": password})
    assert response.status == 200, await response.text()
    body = await response.json()
    client.session.cookie_jar.clear()  # each test says which session it sends
    return Signed(body["user_id"], response.cookies["tg_session"].value, body["csrf_token"])


async def add_user(client: TestClient, auth: dict[str, str], email: str, role: str) -> dict:
    response = await client.post("/admin/users", json={"email": email, "role": role}, headers=auth)
    assert response.status == 201, await response.text()
    return await response.json()
