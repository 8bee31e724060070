"""What the protocol core needs from the rest of the service, as two narrow interfaces:
lookups that catch up with the log on a miss, and a ledger that records decisions.

The token endpoint, introspection, revocation and the policy decision depend on these and
on nothing else that does I/O. `service.adapters` implements them once over the in-memory
read models and the event log; the unit tier runs the same code over an in-memory log."""

from __future__ import annotations

from typing import Protocol

from service.domain.grants import Record
from service.domain.state import AppState, CodeState, ConnectionState, FamilyState, TokenState
from service.eventlog.records import Metadata


class Lookups(Protocol):
    """Reads from the read models. The async ones look again once after catching up with
    the log when the first look finds nothing: what another process wrote a moment ago
    (an application created, a token issued) is found, at the price of one read."""

    async def application(self, client_id: str) -> AppState | None: ...

    async def code(self, code_hash: str) -> CodeState | None: ...

    async def refresh_family(self, refresh_hash: str) -> tuple[str, FamilyState] | None:
        """The family a refresh token was issued to, whether it is the live one or spent."""
        ...

    async def access_token(self, key: bytes, now: float) -> TokenState | None:
        """A live access token by the digest of its value."""
        ...

    def access_token_now(self, key: bytes, now: float) -> TokenState | None:
        """The same, as this process knows it now, without a read: None may be a token
        another process issued a moment ago."""
        ...

    async def family_of(self, token_hash: str, *, refresh: bool) -> str | None:
        """The live family of an access token (or a refresh token) by its hash."""
        ...

    async def resource_server(self, key_hash: str) -> str | None:
        """The id of the live resource server a key belongs to."""
        ...

    def connection(self, company_id: str, client_id: str) -> ConnectionState | None: ...

    def family_version(self, family_id: str) -> int | None:
        """The family stream's version while the family is live."""
        ...

    def family_owner(self, family_id: str) -> tuple[str, str] | None:
        """(client_id, company_id) of a live family."""
        ...

    def application_now(self, client_id: str) -> AppState | None:
        """The application as this process knows it now, without a read (it holds every
        token's application: a token is applied after its application)."""
        ...

    async def catch_up(self) -> None:
        """Apply everything committed so far: after a conflict, or before a read that must
        see what another process committed a moment ago (a refresh token spent there)."""
        ...


class Ledger(Protocol):
    """Records what a decision says to record."""

    async def record(self, record: Record, meta: Metadata, *, visible: bool = False) -> list[int]:
        """Append the record's events; `visible`: wait until this process's models have
        applied them, so its next request sees the change (read-your-writes). Raises
        ConcurrencyError, with nothing written, when a version does not hold."""
        ...
