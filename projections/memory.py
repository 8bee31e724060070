"""The in-process read model that the hot path (token endpoint, gateway, policy checks)
decides from: applications, live tokens and connections, fed from the event log."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence

import structlog

from service import events as ev
from service.domain.applications import CLIENT_CREDENTIALS
from service.domain.client_keys import ClientKey
from service.domain.rate import CLOCKS_APART
from service.domain.state import (
    AppState,
    CodeState,
    ConnectionState,
    FamilyState,
    TokenState,
    networks_of,
)
from service.domain.streams import LONE, lone_family, lone_key
from service.eventlog import RecordedEvent

__all__ = [
    "LONE",
    "AppState",
    "CodeState",
    "ConnectionState",
    "FamilyState",
    "PolicyModel",
    "TokenState",
    "lone_family",
    "networks_of",
]

log = structlog.get_logger(__name__)

#: Settings the model keeps under a shorter name; the others under their own name, if
#: AppState has a field of that name (a setting no decision here needs is not kept).
_RENAMED = {"token_endpoint_auth_method": "auth_method", "dpop_bound_access_tokens": "dpop_bound"}
_MODEL_NAMES: dict[str, str] = {
    setting: _RENAMED.get(setting, setting)
    for setting, _label in ev.APPLICATION_SETTINGS.values()
    if _RENAMED.get(setting, setting) in AppState.__struct_fields__
}


class PolicyModel:
    """Applies events in position order; every lookup is a dict access."""

    name = "policy"
    event_types: frozenset[str] | None = None

    def __init__(self) -> None:
        self.position = 0
        self.apps: dict[str, AppState] = {}
        self.tokens: dict[bytes, TokenState] = {}
        self.families: dict[str, FamilyState] = {}
        # every refresh-token hash issued, live or spent → its family (reuse detection)
        self.refresh_tokens: dict[str, str] = {}
        self.connections: dict[tuple[str, str], ConnectionState] = {}  # (company, client)
        self.codes: dict[str, CodeState] = {}  # authorization-code hash → code
        self._client_families: dict[str, set[str]] = {}
        # lone tokens by client, for application-wide revocations (8 bytes a token; keys
        # of tokens gone otherwise are dropped when the list is next compacted)
        self._client_tokens: dict[str, list[bytes]] = {}
        self._expiry: list[tuple[int, bytes]] = []  # a heap of (expires_at, token hash)
        self._permission_sets: dict[frozenset[str], frozenset[str]] = {}
        #: told of every client_credentials token applied: (client_id, token hash, issued_at)
        self.on_client_token: Callable[[str, str, int], None] | None = None

    def apply(self, events: Sequence[RecordedEvent]) -> None:
        handlers = _HANDLERS
        for recorded in events:
            if recorded.position <= self.position:
                continue  # already applied (idempotent on overlap)
            handler = handlers.get(type(recorded.event))
            if handler is not None:
                handler(self, recorded.event, recorded)
            self.position = recorded.position

    # --- lookups ---------------------------------------------------------------------

    def token(self, token_hash: bytes, now: float) -> TokenState | None:
        state = self.tokens.get(token_hash)
        if state is None:
            return None
        if state.expires_at is not None and state.expires_at <= now:
            self._drop_token(token_hash)  # expired tokens leave the model
            return None
        return state

    def effective_permissions(self, token: TokenState) -> frozenset[str]:
        """What a token may do now: what it was granted, less what its application lost
        since (removing a permission takes effect at once; adding one extends nothing)."""
        app = self.apps.get(token.client_id)
        return token.permissions & app.permissions if app is not None else frozenset()

    def family_of(self, key: bytes, token: TokenState) -> str:
        return token.family_id if token.family_id is not None else lone_family(key.hex())

    def family_version(self, family_id: str) -> int | None:
        """The family stream's version while the family is live, else None."""
        family = self.families.get(family_id)
        if family is not None:
            return family.version
        key = lone_key(family_id)
        return 1 if key is not None and key in self.tokens else None

    def lone_tokens_past(self, client_id: str, count: int) -> tuple[bytes, ...]:
        """A client's live lone tokens, oldest first, when it may hold more than `count` of
        them; none when its list, gone ones included, is no longer (then only is the list
        compacted: a client well within its limit costs nothing)."""
        keys = self._client_tokens.get(client_id)
        if keys is None or len(keys) <= count:
            return ()
        self._compact(client_id)  # the list then holds live keys alone
        return tuple(keys)

    def client_tokens_since(self, since: float) -> Iterator[tuple[str, int]]:
        """(client_id, issued_at) of each live lone token issued at `since` or after, each
        client's oldest first: what a process starting up counts against each client's rate.
        Each client's are walked from the newest, in the order they were recorded, until one
        is older than `since` by more than hosts' clocks are apart."""
        for client_id, keys in self._client_tokens.items():
            recent = []
            for key in reversed(keys):  # newest first; a key gone stays until compacted
                token = self.tokens.get(key)
                if token is None:
                    continue
                if token.issued_at < since - CLOCKS_APART:
                    break
                if token.issued_at >= since:
                    recent.append(token.issued_at)
            for issued_at in reversed(recent):
                yield client_id, issued_at

    def family_owner(self, family_id: str) -> tuple[str, str] | None:
        """(client_id, company_id) of a live family."""
        family = self.families.get(family_id)
        if family is not None:
            return family.client_id, family.company_id
        key = lone_key(family_id)
        token = self.tokens.get(key) if key is not None else None
        return None if token is None else (token.client_id, token.company_id)

    # --- applications ----------------------------------------------------------------

    def _app_created(self, e: ev.ApplicationCreated, r: RecordedEvent) -> None:
        self.apps[e.client_id] = AppState(
            client_id=e.client_id,
            company_id=e.company_id,
            name=e.name,
            grant_type=e.grant_type,
            redirect_uri=e.redirect_uri,
            ip_allowlist=tuple(e.ip_allowlist),
            networks=networks_of(e.ip_allowlist),
            permissions=frozenset(e.permissions),
            notification_emails=tuple(e.notification_emails),
            secret_hash=e.secret_hash,
            secret_version=1,
            previous_secret_hashes=(),
            version=r.version,
        )

    def _app_changed(self, e: ev.Event, r: RecordedEvent) -> None:
        app = self.apps.get(e.client_id)  # type: ignore[attr-defined]
        if app is None:
            return
        after = e.after  # type: ignore[attr-defined]
        name = _MODEL_NAMES.get(ev.APPLICATION_SETTINGS[type(e)][0])
        if name is not None:  # a setting no decision here needs is not kept
            setattr(app, name, tuple(after) if isinstance(after, list) else after)
        if isinstance(e, ev.IpAllowlistChanged):
            app.networks = networks_of(after)
        app.version = r.version

    def _key_added(self, e: ev.ClientKeyAdded, r: RecordedEvent) -> None:
        app = self.apps.get(e.client_id)
        if app is None:
            return
        app.keys = (*app.keys, ClientKey(e.kid, e.thumbprint, dict(e.jwk)))
        app.version = r.version

    def _key_removed(self, e: ev.ClientKeyRemoved, r: RecordedEvent) -> None:
        """A removed key verifies nothing from the moment this is applied."""
        app = self.apps.get(e.client_id)
        if app is None:
            return
        app.keys = tuple(k for k in app.keys if k.kid != e.kid)
        app.version = r.version

    def _permissions_changed(self, e: ev.PermissionsChanged, r: RecordedEvent) -> None:
        app = self.apps.get(e.client_id)
        if app is None:
            return
        app.permissions = frozenset(e.after)
        app.version = r.version
        removed = frozenset(e.before) - app.permissions
        if not removed:
            return  # added permissions do not extend existing grants
        for key, connection in self.connections.items():
            if key[1] == e.client_id:
                connection.permissions = self._intern(connection.permissions - removed)
        for family_id in self._client_families.get(e.client_id, ()):
            family = self.families[family_id]
            family.permissions = self._intern(family.permissions - removed)
            for token_hash in family.tokens:
                token = self.tokens.get(token_hash)
                if token is not None:
                    token.permissions = self._intern(token.permissions - removed)
        # Lone tokens too: a permission removed and added back must not come back to them.
        for lone_token in self._client_tokens.get(e.client_id, ()):
            lone = self.tokens.get(lone_token)
            if lone is not None:
                lone.permissions = self._intern(lone.permissions - removed)
        # Codes not yet redeemed too: redeemed once a later consent had given the connection
        # the permission again, one would carry it back into a new grant.
        for code in self.codes.values():
            if code.client_id == e.client_id and not code.redeemed:
                code.permissions = tuple(p for p in code.permissions if p not in removed)

    def _secret_rotated(self, e: ev.ClientSecretRotated, r: RecordedEvent) -> None:
        app = self.apps.get(e.client_id)
        if app is None:
            return
        app.previous_secret_hashes = (*app.previous_secret_hashes, app.secret_hash)
        app.secret_hash = e.secret_hash
        app.secret_version = e.secret_version
        app.version = r.version

    def _app_deleted(self, e: ev.ApplicationDeleted, _r: RecordedEvent) -> None:
        self.apps.pop(e.client_id, None)
        for key in [k for k in self.connections if k[1] == e.client_id]:
            del self.connections[key]
        for family_id in list(self._client_families.get(e.client_id, ())):
            self._revoke_family(family_id)
        for token_key in self._client_tokens.pop(e.client_id, ()):
            self.tokens.pop(token_key, None)

    def _app_tokens_revoked(self, e: ev.ApplicationTokensRevoked, r: RecordedEvent) -> None:
        """The kill switch: every token of the application goes, and every code not yet
        redeemed (it would otherwise mint a token after the switch); the application and
        its connections stay."""
        if (app := self.apps.get(e.client_id)) is not None:
            app.version = r.version  # recorded on the application's stream
        for family_id in list(self._client_families.get(e.client_id, ())):
            self._revoke_family(family_id)
        for token_key in self._client_tokens.pop(e.client_id, ()):
            self.tokens.pop(token_key, None)
        self._forget_unredeemed_codes(e.client_id)

    def _forget_unredeemed_codes(self, client_id: str, company_id: str | None = None) -> None:
        """The application's codes not yet redeemed (only those of `company_id`'s users,
        when given) can no longer be: a redeemed one stays, so that a replay of it is still
        seen as one."""
        doomed = [
            code_hash
            for code_hash, code in self.codes.items()
            if code.client_id == client_id
            and not code.redeemed
            and (company_id is None or code.company_id == company_id)
        ]
        for code_hash in doomed:
            del self.codes[code_hash]

    def live_grants(self, client_id: str, now: float) -> int:
        """What the kill switch ends: the application's live token families and its live
        client_credentials tokens."""
        keys = self._client_tokens.get(client_id, ())
        lone = sum(1 for key in keys if self.token(key, now) is not None)
        return len(self._client_families.get(client_id, ())) + lone

    # --- connections -----------------------------------------------------------------

    def _connection_granted(self, e: ev.ConnectionGranted, r: RecordedEvent) -> None:
        self.connections[(e.company_id, e.client_id)] = ConnectionState(
            self._intern(frozenset(e.permissions)), e.user_id, r.version
        )

    def _connection_revoked(self, e: ev.ConnectionRevoked, _r: RecordedEvent) -> None:
        """The company's consent withdrawn: its grants go, and the codes issued under it
        (redeemed after a later consent, one would carry the withdrawn request)."""
        self.connections.pop((e.company_id, e.client_id), None)
        self._forget_unredeemed_codes(e.client_id, e.company_id)
        for family_id in list(self._client_families.get(e.client_id, ())):
            if self.families[family_id].company_id == e.company_id:
                self._revoke_family(family_id)
        keys = self._client_tokens.get(e.client_id)
        if keys:
            for key in keys:
                token = self.tokens.get(key)
                if token is not None and token.company_id == e.company_id:
                    del self.tokens[key]
            self._compact(e.client_id)

    # --- authorization codes ---------------------------------------------------------

    def _code_issued(self, e: ev.AuthorizationCodeIssued, _r: RecordedEvent) -> None:
        self.codes[e.code_hash] = CodeState(
            e.client_id,
            e.company_id,
            e.user_id,
            e.redirect_uri,
            tuple(e.permissions),
            e.code_challenge,
            e.expires_at,
            dpop_jkt=e.dpop_jkt,
            redirect_uri_given=e.redirect_uri_given,
        )

    def _code_redeemed(self, e: ev.AuthorizationCodeRedeemed, _r: RecordedEvent) -> None:
        if (code := self.codes.get(e.code_hash)) is not None:
            code.redeemed = True

    def forget_expired_codes(self, now: float, grace: int = 3600) -> None:
        """Codes live 10 minutes; a spent one is kept a while longer to catch its reuse."""
        for code_hash in [h for h, c in self.codes.items() if c.expires_at + grace < now]:
            del self.codes[code_hash]

    # --- tokens ----------------------------------------------------------------------

    def _token_issued(self, e: ev.AccessTokenIssued, r: RecordedEvent) -> None:
        if e.refresh_token_hash is None and e.family_id == lone_family(e.token_hash):
            # A lone token (client_credentials): no family record, the smallest footprint.
            key = bytes.fromhex(e.token_hash)
            permissions = self._intern(frozenset(e.permissions))
            self.tokens[key] = TokenState(
                None, e.client_id, e.company_id, permissions, e.expires_at, e.issued_at,
                e.dpop_jkt,
            )  # fmt: skip
            self._client_tokens.setdefault(e.client_id, []).append(key)
            if e.expires_at is not None:
                heapq.heappush(self._expiry, (e.expires_at, key))
            if self.on_client_token is not None and e.grant_type == CLIENT_CREDENTIALS:
                self.on_client_token(e.client_id, e.token_hash, e.issued_at)
            return
        family = FamilyState(
            e.client_id, e.company_id, permissions=self._intern(frozenset(e.permissions)),
            version=r.version, issued_at=e.issued_at,
            jkt="" if e.binds_grant is False else e.dpop_jkt,
        )  # fmt: skip
        self.families[e.family_id] = family
        self._client_families.setdefault(e.client_id, set()).add(e.family_id)
        self._add_token(
            family, e.family_id, e.token_hash, e.permissions, e.expires_at, e.issued_at,
            e.dpop_jkt,
        )  # fmt: skip
        if e.refresh_token_hash is not None:
            family.refresh_token_hash = e.refresh_token_hash
            family.refresh_hashes = (e.refresh_token_hash,)
            family.refresh_expires_at = e.refresh_expires_at
            self.refresh_tokens[e.refresh_token_hash] = e.family_id

    def _token_refreshed(self, e: ev.TokenRefreshed, r: RecordedEvent) -> None:
        family = self.families.get(e.family_id)
        if family is None:
            return
        family.version = r.version
        live = family.refresh_token_hash
        sibling = e.spent_refresh_token_hash in family.unpresented
        if sibling or not e.grace_reuse or live is None:
            # A rotation: of the live one, or of one a repeat rotated away, presented for
            # the first time. Either way every other refresh token of the family is spent
            # at once, with no grace of its own: two holders cannot take turns, each
            # within the grace the other's rotation opened. Only the one presented may be
            # repeated, within the grace from now (a retry of this very request).
            family.recently_spent = (e.spent_refresh_token_hash,)
            family.spent_at = e.issued_at
            family.unpresented = ()
        else:
            # A repeat within the grace rotated the live one away: it may be repeated too,
            # within the same grace (anchored at the first rotation), and whoever holds it
            # (the other answer of a race) may still present it (FamilyState.unpresented).
            family.recently_spent = (*family.recently_spent, live)
            family.unpresented = (*family.unpresented, live)
        family.refresh_token_hash = e.refresh_token_hash
        family.refresh_hashes = (*family.refresh_hashes, e.refresh_token_hash)
        family.refresh_expires_at = e.refresh_expires_at
        family.issued_at = e.issued_at
        if e.binds_grant:
            family.jkt = e.dpop_jkt
        self.refresh_tokens[e.refresh_token_hash] = e.family_id
        self._add_token(
            family, e.family_id, e.token_hash, e.permissions, e.expires_at, e.issued_at,
            e.dpop_jkt,
        )  # fmt: skip

    def _token_revoked(self, e: ev.TokenRevoked, _r: RecordedEvent) -> None:
        if e.family_id in self.families:
            self._revoke_family(e.family_id)
        elif (key := lone_key(e.family_id)) is not None:
            self.tokens.pop(key, None)

    def _compact(self, client_id: str) -> None:
        keys = self._client_tokens.get(client_id)
        if keys is not None:
            keys[:] = [k for k in keys if k in self.tokens]

    def _add_token(
        self,
        family: FamilyState,
        family_id: str,
        token_hash: str,
        permissions: list[str],
        expires_at: int | None,
        issued_at: int,
        jkt: str = "",
    ) -> None:
        key = bytes.fromhex(token_hash)
        family.tokens = (*family.tokens, key)
        self.tokens[key] = TokenState(
            family_id,
            family.client_id,
            family.company_id,
            self._intern(frozenset(permissions) & family.permissions),
            expires_at,
            issued_at,
            jkt,
        )
        if expires_at is not None:
            heapq.heappush(self._expiry, (expires_at, key))

    def _intern(self, permissions: frozenset[str]) -> frozenset[str]:
        """Tokens share a handful of permission sets: keep one copy of each."""
        return self._permission_sets.setdefault(permissions, permissions)

    def _revoke_family(self, family_id: str) -> None:
        """A revoked family leaves the model entirely: the log keeps its history, and a
        token or refresh token of it presented later is simply unknown."""
        family = self.families.pop(family_id, None)
        if family is None:
            return
        for token_hash in family.tokens:
            self.tokens.pop(token_hash, None)
        for refresh_hash in family.refresh_hashes:
            self.refresh_tokens.pop(refresh_hash, None)
        client_families = self._client_families.get(family.client_id)
        if client_families is not None:
            client_families.discard(family_id)

    def _drop_token(self, token_hash: bytes) -> None:
        self.tokens.pop(token_hash, None)

    def compact(self, now: float) -> None:
        """Forget the keys of lone tokens that are gone (revoked one by one, expired), and
        authorization codes past their reuse window."""
        for client_id in list(self._client_tokens):
            self._compact(client_id)
        self.forget_expired_codes(now)

    def sweep(self, now: float) -> int:
        """Expired tokens leave the model (the log keeps them): a heap makes this cheap."""
        dropped = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, key = heapq.heappop(self._expiry)
            token = self.tokens.get(key)
            if token is not None and token.expires_at is not None and token.expires_at <= now:
                del self.tokens[key]
                dropped += 1
        return dropped


#: what applies each event: functions of the class, not methods bound to a model, so that a
#: model holds no reference to itself and goes as soon as it is dropped (a snapshot's writer
#: builds one a round; through a cycle its hundreds of megabytes waited for a full
#: collection)
_HANDLERS: dict[type[ev.Event], Callable[[PolicyModel, ev.Event, RecordedEvent], None]] = {
    ev.ApplicationCreated: PolicyModel._app_created,  # type: ignore[dict-item]
    **{setting: PolicyModel._app_changed for setting in ev.APPLICATION_SETTINGS},
    ev.ClientKeyAdded: PolicyModel._key_added,  # type: ignore[dict-item]
    ev.ClientKeyRemoved: PolicyModel._key_removed,  # type: ignore[dict-item]
    ev.PermissionsChanged: PolicyModel._permissions_changed,  # type: ignore[dict-item]
    ev.ClientSecretRotated: PolicyModel._secret_rotated,  # type: ignore[dict-item]
    ev.ApplicationDeleted: PolicyModel._app_deleted,  # type: ignore[dict-item]
    ev.ApplicationTokensRevoked: PolicyModel._app_tokens_revoked,  # type: ignore[dict-item]
    ev.ConnectionGranted: PolicyModel._connection_granted,  # type: ignore[dict-item]
    ev.ConnectionRevoked: PolicyModel._connection_revoked,  # type: ignore[dict-item]
    ev.AccessTokenIssued: PolicyModel._token_issued,  # type: ignore[dict-item]
    ev.TokenRefreshed: PolicyModel._token_refreshed,  # type: ignore[dict-item]
    ev.TokenRevoked: PolicyModel._token_revoked,  # type: ignore[dict-item]
    ev.AuthorizationCodeIssued: PolicyModel._code_issued,  # type: ignore[dict-item]
    ev.AuthorizationCodeRedeemed: PolicyModel._code_redeemed,  # type: ignore[dict-item]
}
