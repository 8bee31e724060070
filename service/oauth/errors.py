"""RFC 6749 §5.2 errors (and RFC 6750 §3.1, RFC 7009 §2.2.1): one class per code,
carrying its status and headers; the web middleware renders them.
https://www.rfc-editor.org/rfc/rfc6749#section-5.2"""

from __future__ import annotations

from service.errors import TollgateError, rfc6749_text

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class OAuthError(TollgateError):
    """Its description in RFC 6749 §5.2's characters (`rfc6749_text`)."""

    status = 400

    def __init__(self, description: str = "", *, headers: dict[str, str] | None = None) -> None:
        super().__init__(rfc6749_text(description), headers=NO_STORE | (headers or {}))


class InvalidRequest(OAuthError):
    error = "invalid_request"


class InvalidClient(OAuthError):
    """Client authentication failed (RFC 6749 §5.2): 401 with a Basic challenge; 400 without
    one for a client that authenticated in the body (service/web/oauth.py)."""

    error = "invalid_client"
    status = 401

    def __init__(self, description: str = "client authentication failed") -> None:
        super().__init__(description, headers={"WWW-Authenticate": 'Basic realm="tollgate"'})


class InvalidBearerKey(OAuthError):
    """A resource server's Bearer key at introspection that is unknown or revoked: RFC 7662
    §2.3 sends it to RFC 6750 §3, so a Bearer challenge, not a Basic one."""

    error = "invalid_token"
    status = 401

    def __init__(self, description: str = "unknown or revoked resource-server key") -> None:
        description = rfc6749_text(description)
        challenge = (
            f'Bearer realm="tollgate", error="invalid_token", error_description="{description}"'
        )
        super().__init__(description, headers={"WWW-Authenticate": challenge})


class InvalidGrant(OAuthError):
    error = "invalid_grant"


class UnauthorizedClient(OAuthError):
    error = "unauthorized_client"


class UnsupportedGrantType(OAuthError):
    error = "unsupported_grant_type"


class InvalidScope(OAuthError):
    error = "invalid_scope"


class UnsupportedTokenType(OAuthError):
    error = "unsupported_token_type"


class IpNotAllowed(OAuthError):
    """A valid credential from an address outside the application's allow list."""

    error = "ip_not_allowed"
    status = 403


class SlowDown(OAuthError):
    """Too many token requests from one client: 429 with Retry-After (RFC 6585 §4), and
    the code RFC 8628 §3.5 gives a client that polls too fast."""

    error = "slow_down"
    status = 429

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            f"too many token requests for this client; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


class TemporarilyUnavailable(OAuthError):
    error = "temporarily_unavailable"
    status = 503


# --- RFC 6750 §3.1: errors of a request that carries (or lacks) a Bearer access token ---

BEARER_REALM = "tollgate"


class InvalidToken(OAuthError):
    """401 invalid_token; with no error code in the challenge when no token was sent at
    all (RFC 6750 §3.1). https://www.rfc-editor.org/rfc/rfc6750#section-3.1"""

    error = "invalid_token"
    status = 401

    def __init__(self, description: str, *, sent: bool = True, realm: str = BEARER_REALM) -> None:
        description = rfc6749_text(description)
        challenge = f'Bearer realm="{realm}"'
        if description and sent:
            challenge += f', error="invalid_token", error_description="{description}"'
        super().__init__(description, headers={"WWW-Authenticate": challenge})


class InsufficientScope(OAuthError):
    error = "insufficient_scope"
    status = 403

    def __init__(self, permission: str) -> None:
        # A catalogue name, checked where a caller names it; held to RFC 6750 §3's
        # characters all the same: a header cannot carry a line break or a stray quote.
        permission = rfc6749_text(permission)
        challenge = (
            f'Bearer realm="{BEARER_REALM}", error="insufficient_scope", scope="{permission}"'
        )
        super().__init__(
            f"this token lacks the {permission} permission",
            headers={"WWW-Authenticate": challenge},
        )


class TokenIpNotAllowed(OAuthError):
    """A valid access token from an address outside its application's allow list: 403 with
    a Bearer challenge; `revoked` says whether the token died of it."""

    error = "ip_not_allowed"
    status = 403

    def __init__(self, ip: str, *, revoked: bool) -> None:
        what = "the token has been revoked" if revoked else "no token was issued"
        challenge = f'Bearer realm="{BEARER_REALM}", error="ip_not_allowed"'
        super().__init__(
            f"requests for this client are not allowed from {ip}; {what}",
            headers={"WWW-Authenticate": challenge},
        )
