"""In-memory directory: companies, users, admin keys and resource-server keys, for
authenticating admin requests, logins and resource servers without a database trip."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from service import events as ev
from service.eventlog import RecordedEvent


class Company(msgspec.Struct):
    company_id: str
    name: str
    # The company stream's version: role changes and removals are appended on condition
    # that it has not moved, so two admins demoting each other cannot both succeed.
    version: int = 0


class User(msgspec.Struct):
    """One company's account of an address: the same address may have one at several
    companies, each with its own password, role and lifecycle."""

    user_id: str
    company_id: str
    email: str
    role: str
    password_hash: str
    removed: bool = False
    # The version of the stream the user was created on (UserAdded, UserPasswordChanged):
    # the company's stream of the address, or for a user created before accounts were per
    # company, the address's own (service/domain/streams.py). This model is fed without
    # stream names, so the command handlers ask the log which (see _stream_of there).
    version: int = 0


class AdminKey(msgspec.Struct):
    key_id: str
    company_id: str
    label: str
    revoked: bool = False
    issued_by: str | None = None  # the admin whose key it is (a user id)
    #: its admin was removed or stopped being one, before or after the key was recorded:
    #: it opens nothing, whatever revocation was or was not recorded for it (a key issued
    #: as its admin was being removed, which the removal's revocations did not see)
    issuer_gone: bool = False

    @property
    def live(self) -> bool:
        return not self.revoked and not self.issuer_gone


class ResourceServer(msgspec.Struct):
    resource_server_id: str
    name: str
    revoked: bool = False


#: the events DirectoryModel._apply acts on
_HANDLED = frozenset({
    ev.CompanyCreated, ev.UserAdded, ev.UserRoleChanged, ev.UserRemoved,
    ev.UserPasswordChanged, ev.AdminKeyIssued, ev.AdminKeyRevoked,
    ev.ResourceServerRegistered, ev.ResourceServerKeyRevoked,
})  # fmt: skip


def _admin_of(user: User | None, company_id: str) -> bool:
    return (
        user is not None
        and not user.removed
        and user.role == "admin"
        and (user.company_id == company_id)
    )


class DirectoryModel:
    name = "directory"

    def __init__(self) -> None:
        self.position = 0
        self.companies: dict[str, Company] = {}
        self.users: dict[str, User] = {}
        # lower-cased email → the live accounts of the address (user ids, one per company)
        self.accounts_by_email: dict[str, list[str]] = {}
        self.admin_keys: dict[str, AdminKey] = {}  # key id → key
        self.admin_key_hashes: dict[str, str] = {}  # live key hash → key id
        self.resource_server_hashes: dict[str, ResourceServer] = {}  # live key hash → server
        self.resource_servers: dict[str, ResourceServer] = {}  # id → server, revoked ones too

    def apply(self, events: Sequence[RecordedEvent]) -> None:
        # Almost every event of the log is a token's, which this model does not hold: a
        # set look-up passes it by, rather than the type tests of _apply (0.8 us an event,
        # at every start for the whole log and under issuance for every token).
        handled = _HANDLED
        for recorded in events:
            if recorded.position <= self.position:
                continue
            if type(recorded.event) in handled:
                self._apply(recorded.event, recorded.version)
            self.position = recorded.position

    def _apply(self, e: ev.Event, version: int) -> None:
        if isinstance(e, ev.CompanyCreated):
            self.companies[e.company_id] = Company(e.company_id, e.name, version)
        elif isinstance(e, ev.UserAdded):
            self.users[e.user_id] = User(
                e.user_id, e.company_id, e.email, e.role, e.password_hash, version=version
            )
            self.accounts_by_email.setdefault(e.email.lower(), []).append(e.user_id)
        elif isinstance(e, ev.UserRoleChanged | ev.UserRemoved):
            self._company_change(e, version)
        elif isinstance(e, ev.UserPasswordChanged):
            if (user := self.users.get(e.user_id)) is not None:
                user.password_hash = e.password_hash
                user.version = version
        elif isinstance(e, ev.AdminKeyIssued):
            issuer = self.users.get(e.issued_by) if e.issued_by is not None else None
            self.admin_keys[e.key_id] = AdminKey(
                e.key_id, e.company_id, e.label, issued_by=e.issued_by,
                issuer_gone=e.issued_by is not None and not _admin_of(issuer, e.company_id),
            )  # fmt: skip
            self.admin_key_hashes[e.key_hash] = e.key_id
        elif isinstance(e, ev.AdminKeyRevoked):
            if (key := self.admin_keys.get(e.key_id)) is not None:
                key.revoked = True
            for key_hash, key_id in list(self.admin_key_hashes.items()):
                if key_id == e.key_id:
                    del self.admin_key_hashes[key_hash]
        elif isinstance(e, ev.ResourceServerRegistered):
            server = ResourceServer(e.resource_server_id, e.name)
            self.resource_server_hashes[e.key_hash] = server
            self.resource_servers[e.resource_server_id] = server
        elif isinstance(e, ev.ResourceServerKeyRevoked):
            if (found := self.resource_servers.get(e.resource_server_id)) is not None:
                found.revoked = True
            for key_hash, server in list(self.resource_server_hashes.items()):
                if server.resource_server_id == e.resource_server_id:
                    del self.resource_server_hashes[key_hash]

    def _company_change(self, e: ev.UserRoleChanged | ev.UserRemoved, version: int) -> None:
        """Recorded on the company's stream (see Company.version)."""
        if (company := self.companies.get(e.company_id)) is not None:
            company.version = version
        user = self.users.get(e.user_id)
        if user is None:
            return
        if isinstance(e, ev.UserRoleChanged):
            user.role = e.after
        else:
            user.removed = True
            live = self.accounts_by_email.get(user.email.lower(), [])
            if user.user_id in live:
                live.remove(user.user_id)
            if not live:
                self.accounts_by_email.pop(user.email.lower(), None)
        if not _admin_of(user, e.company_id):  # their keys end with it, for good
            for key in self.admin_keys.values():
                if key.issued_by == user.user_id:
                    key.issuer_gone = True

    def accounts(self, email: str) -> list[User]:
        """The live accounts of an address, one per company, oldest first."""
        ids = self.accounts_by_email.get(email.lower(), ())
        return [self.users[user_id] for user_id in ids if user_id in self.users]

    def account(self, company_id: str, email: str) -> User | None:
        """The company's live account of the address, whichever stream it was created on."""
        found = [u for u in self.accounts(email) if u.company_id == company_id]
        return found[0] if found else None

    def user_by_email(self, email: str) -> User | None:
        """The newest live account of the address: for tools and tests that know it has one.
        Sign-in and the admin API use `accounts` and `account`."""
        found = self.accounts(email)
        return found[-1] if found else None

    def company_users(self, company_id: str) -> list[User]:
        return [u for u in self.users.values() if u.company_id == company_id and not u.removed]

    def company_keys(self, company_id: str) -> list[AdminKey]:
        return [k for k in self.admin_keys.values() if k.company_id == company_id]
