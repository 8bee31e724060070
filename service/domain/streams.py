"""Stream names and family ids: stored in the log, so their formats never change.

Every stream Tollgate writes is named here and nowhere else; `tests/unit/test_streams.py`
pins each format, because a changed name would split a stream's history in two (old
events under the old name, new ones under the new) and break optimistic concurrency.
"""

from __future__ import annotations

from service.domain.credentials import digest

#: A lone token's family id is LONE + its hash: client_credentials tokens need no family
#: record in the read model (memory per live token is what bounds a process).
LONE = "fam_"


def company(company_id: str) -> str:
    return f"company-{company_id}"


def user(email: str) -> str:
    """The stream of a user created before accounts were per company: keyed by the address
    alone. No new account is created on it; those that were keep it for every later event
    (service/commands/directory.py asks the log which stream a user was created on)."""
    return "user-" + digest(email.lower())[:40]


def account(company_id: str, email: str) -> str:
    """One company's account of an address (the same address may have an account at
    several companies). Keyed by both, so two concurrent adds of one address at one company
    cannot both succeed, while another company's account of it is another stream."""
    return "user-" + digest(company_id + "\n" + email.lower())[:40]


def admin_key(key_id: str) -> str:
    return f"admin-key-{key_id}"


def resource_server(server_id: str) -> str:
    return f"resource-server-{server_id}"


def application(client_id: str) -> str:
    return f"application-{client_id}"


def connection(company_id: str, client_id: str) -> str:
    return f"connection-{company_id}-{client_id}"


def token_family(family_id: str) -> str:
    return f"token-{family_id}"


def code(code_hash: str) -> str:
    return f"code-{code_hash[:40]}"


def violations(client_id: str) -> str:
    return f"violations-{client_id}"


def secret_use(client_id: str) -> str:
    return f"secret-use-{client_id}"


def alert_window(kind: str, client_id: str, ip: str, window_start: int) -> str:
    """One (application, address, window) of a coalesced alert (`kind`: "violations" or
    "secret-use"): its first attempt is appended at version 0, so one process records it
    and the others learn that the window is open. The address is bounded: a stream name
    is a key."""
    return f"{kind}-window-{client_id}-{window_start}-{ip[:64]}"


def client_assertion(jti_hash: str) -> str:
    """One accepted client assertion (its jti, hashed with its client_id): appended at
    version 0, so a replay fails the append in whichever process sees it second."""
    return f"client-assertion-{jti_hash[:40]}"


def dpop_proof(jti_hash: str) -> str:
    """One accepted DPoP proof (its jti, hashed with its key's thumbprint): appended at
    version 0, so a replay fails the append in whichever process sees it second."""
    return f"dpop-proof-{jti_hash[:40]}"


def notification(position: int) -> str:
    return f"notification-{position}"


def notification_failures(position: int) -> str:
    return f"notification-failures-{position}"


def lone_family(token_hash_hex: str) -> str:
    return LONE + token_hash_hex


def code_family(code_hash: str) -> str:
    """One family per authorization code: a second redemption finds its stream taken."""
    return LONE + code_hash[:40]


def lone_key(family_id: str) -> bytes | None:
    """The token hash behind a lone family id, or None for any other family id."""
    if len(family_id) != len(LONE) + 64 or not family_id.startswith(LONE):
        return None
    try:
        return bytes.fromhex(family_id[len(LONE) :])
    except ValueError:
        return None


def admin_key_of(actor: str) -> str | None:
    """The stream of the admin key an actor ("admin_key:<id>") acts with, if any."""
    prefix = "admin_key:"
    return admin_key(actor[len(prefix) :]) if actor.startswith(prefix) else None


def family_of(token_hash: bytes, family_id: str | None) -> str:
    """A token's family id: its own, or the one a lone token's hash gives it."""
    return family_id if family_id is not None else lone_family(token_hash.hex())
