"""The state the token and policy rules decide on: applications, live tokens, families,
connections and authorization codes, as the in-memory read model holds them."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import msgspec

from service.domain.client_keys import CLIENT_SECRET_BASIC, ClientKey

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AppState(msgspec.Struct, gc=False):
    client_id: str
    company_id: str
    name: str
    grant_type: str
    redirect_uri: str | None
    ip_allowlist: tuple[str, ...]
    networks: tuple[IPNetwork, ...]
    permissions: frozenset[str]
    notification_emails: tuple[str, ...]
    secret_hash: str
    secret_version: int
    previous_secret_hashes: tuple[str, ...]
    version: int  # the application stream's version: a condition for writes that rely on it
    cc_token_limit: int | None = None  # None: the CC_TOKEN_LIMIT setting
    auth_method: str = CLIENT_SECRET_BASIC  # token_endpoint_auth_method (RFC 7591 §2)
    keys: tuple[ClientKey, ...] = ()  # public keys for private_key_jwt (RFC 7523 §2.2)
    dpop_bound: bool = False  # dpop_bound_access_tokens (RFC 9449 §5.2): proofs required


# Hundreds of thousands of these live for the life of the process: msgspec Structs with
# gc=False are small, quick to build, and never scanned by the cycle collector (they hold
# only strings, numbers, tuples and frozensets, so they cannot form a cycle). Array-like:
# a model snapshot (projections/snapshots.py) holds each as its values, not its field names
# (157 bytes a token against 226).
class TokenState(msgspec.Struct, gc=False, array_like=True):
    family_id: str | None  # None: a lone token, its family id derived from its hash
    client_id: str
    company_id: str
    permissions: frozenset[str]
    expires_at: int | None
    issued_at: int = 0  # unix seconds (introspection's `iat`); 0: not known
    jkt: str = ""  # the DPoP key thumbprint it is bound to (RFC 9449 §6.1); "": Bearer


class FamilyState(msgspec.Struct, gc=False, array_like=True):
    client_id: str
    company_id: str
    tokens: tuple[bytes, ...] = ()
    refresh_token_hash: str | None = None  # the live one
    refresh_hashes: tuple[str, ...] = ()  # every one issued (spent ones show reuse)
    refresh_expires_at: int | None = None
    # The grant (RFC 6749 §6: what a refresh may ask for, all of it when it names no scope):
    # what the resource owner consented to, less what the application has lost since.
    permissions: frozenset[str] = frozenset()
    version: int = 0  # the token stream's version
    issued_at: int = 0  # when its live refresh token was issued (introspection's `iat`)
    # The refresh token the last rotation spent, then each live one that a repeat of it
    # within the grace rotated away, and when that rotation happened: a retry after a
    # lost answer (or a request that lost a race) gets a new pair instead of revoking the
    # grant, until the grace has passed (service/domain/grants.py, refresh).
    recently_spent: tuple[str, ...] = ()
    spent_at: int | None = None
    jkt: str = ""  # the DPoP key the grant is bound to: each refresh must prove it
    # Refresh tokens handed out and then rotated away by a repeat, none presented since:
    # of two refreshes racing with one token, the client cannot tell which answer holds the
    # live one, so the first of these it presents rotates as the live one would, and
    # spends the others at once (grants.refresh): a live refresh token, in effect, until
    # any other of the family is presented (which empties it) or the grant expires.
    unpresented: tuple[str, ...] = ()


class ConnectionState(msgspec.Struct, gc=False):
    permissions: frozenset[str]
    user_id: str
    version: int = 0  # the connection stream's version: a condition for token writes


class CodeState(msgspec.Struct, gc=False):
    client_id: str
    company_id: str
    user_id: str
    redirect_uri: str
    permissions: tuple[str, ...]
    code_challenge: str | None
    expires_at: int
    redeemed: bool = False
    dpop_jkt: str | None = None  # RFC 9449 §10
    redirect_uri_given: bool = True  # the authorization request named it (RFC 6749 §4.1.3)


def networks_of(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)
