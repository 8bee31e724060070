"""The parts of Tollgate's OpenAPI document: schemas (the request ones taken from the
handlers' msgspec Structs), shared responses and headers, security schemes, and helpers."""

from __future__ import annotations

from typing import Any

import msgspec

from service.web.admin import AdminKeyIn, ApplicationIn, ApplicationPatchIn, JwksIn, UserIn
from service.web.login import LoginIn
from service.web.policy_check import CheckIn

Json = dict[str, Any]

AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]

STRING: Json = {"type": "string"}
STRINGS: Json = {"type": "array", "items": STRING}
JSON = "application/json"
HTML = "text/html"
FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
OAUTH_BODIES = (FORM, MULTIPART, JSON)  # the seed's curl --form and JSON examples too

ADMIN = [{"adminKey": []}, {"session": [], "csrf": []}]  # a change needs the CSRF header
ADMIN_READ = [{"adminKey": []}, {"session": []}]
CLIENT = [{"clientBasic": []}, {}]  # {}: client_id + client_secret in the body instead


def ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: dict[str, Json], optional: dict[str, Json] | None = None) -> Json:
    """A closed object: a field the service starts to send must be documented first."""
    return {
        "type": "object",
        "properties": required | (optional or {}),
        "required": list(required),
        "additionalProperties": False,
    }


def nullable(schema: Json) -> Json:
    return {"anyOf": [schema, {"type": "null"}]}


# --- schemas -----------------------------------------------------------------------------


def request_schemas() -> Json:
    """Exactly what the handlers decode: the Structs' own JSON Schema, from msgspec."""
    structs = [ApplicationIn, ApplicationPatchIn, JwksIn, UserIn, AdminKeyIn, LoginIn, CheckIn]
    _, components = msgspec.json.schema_components(
        structs, ref_template="#/components/schemas/{name}"
    )
    notes = {
        "ApplicationIn": "Checked further by the domain rules (400 naming the field): name "
        "1-100 characters; redirect_uri required for authorization_code (absolute https, "
        "http only on loopback hosts); ip_allowlist of addresses and CIDR ranges, at least "
        "one for client_credentials; permissions a non-empty subset of the catalogue "
        "(scopes_supported in the server metadata); cc_token_limit for client_credentials "
        "only (null: the CC_TOKEN_LIMIT setting, 0: no bound); jwks holds public keys only "
        "(a JWK with private members such as d is a 400); dpop_bound_access_tokens (RFC 9449 "
        "§5.2): every token request must carry a DPoP proof.",
        "ApplicationPatchIn": "Only the fields sent change; redirect_uri null clears it, "
        "cc_token_limit null gives back the setting. A grant_type other than the "
        "application's is refused (400): it cannot be changed.",
        "JwksIn": "A JWK Set (RFC 7517 §5) of public signing keys: RSA (2048 bits or more), "
        "EC (P-256, P-384, P-521) or OKP (Ed25519, Ed448). Private members (d, p, q, ...) "
        "and symmetric keys are refused (400). A key without kid is named by its RFC 7638 "
        "thumbprint.",
        "UserIn": "Without a password one is generated and returned once.",
        "CheckIn": "The gateway's decision for a resource server: an access token, the "
        "caller's IP address and optionally the permission the request needs. A client that "
        "sent Authorization: DPoP: its DPoP proof (dpop_proof) with the method and URL it "
        "called (htm, htu), all three; a DPoP-bound token needs them (RFC 9449 §7.1).",
    }
    for name, note in notes.items():
        components[name]["description"] = note
    return dict(components)


def application(*, full: bool) -> Json:
    fields: Json = {
        "client_id": STRING,
        "name": STRING,
        "grant_type": {"enum": ["authorization_code", "client_credentials"]},
        "redirect_uri": nullable(STRING),
        "ip_allowlist": STRINGS,
        "permissions": STRINGS,
        "notification_emails": STRINGS,
        "secret_version": {"type": "integer", "minimum": 1},
        "cc_token_limit": nullable({"type": "integer", "minimum": 0}),
        "token_endpoint_auth_method": {"enum": AUTH_METHODS},
        "dpop_bound_access_tokens": {"type": "boolean"},
        "version": {"type": "integer", "minimum": 1},
    }
    if full:
        fields |= {
            "jwks": obj({"keys": {"type": "array", "items": {"type": "object"}}})
            | {"description": "The public keys for private_key_jwt (RFC 7591 §2)."},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
        }
    return obj(fields)


def response_schemas() -> Json:
    created = application(full=True)
    created["properties"]["client_secret"] = {
        **STRING,
        "description": "Shown in this response only; stored as a hash.",
    }
    created["properties"]["client_secret"]["description"] += (
        " Not sent for a private_key_jwt application (rotate-secret makes one)."
    )
    user = {"user_id": STRING, "email": STRING, "role": {"enum": ["admin", "member"]}}
    return {
        "Error": obj(
            {"error": STRING, "error_description": STRING},
        )
        | {"description": "Every error, everywhere (RFC 6749 §5.2 codes at /oauth)."},
        "Application": application(full=True),
        "CreatedApplication": created,
        "ApplicationList": obj(
            {"applications": {"type": "array", "items": application(full=False)}}
        ),
        "ClientKeyList": obj(
            {
                "client_id": STRING,
                "keys": {
                    "type": "array",
                    "items": obj(
                        {
                            "kid": STRING,
                            "thumbprint": {**STRING, "description": "RFC 7638, SHA-256"},
                            "jwk": {"type": "object", "description": "public members only"},
                        }
                    ),
                },
            }
        ),
        "RotatedSecret": obj(
            {"client_id": STRING, "client_secret": STRING, "secret_version": {"type": "integer"}}
        ),
        "User": obj(user),
        "CreatedUser": obj(user, {"password": {**STRING, "description": "generated: shown once"}}),
        "UserList": obj({"users": {"type": "array", "items": ref("User")}}),
        "CreatedAdminKey": obj({"key_id": STRING, "admin_key": STRING, "label": STRING}),
        "AdminKeyList": obj(
            {
                "keys": {
                    "type": "array",
                    "items": obj(
                        {
                            "key_id": STRING,
                            "label": STRING,
                            "revoked": {"type": "boolean"},
                            "issued_by": {
                                **nullable(STRING),
                                "description": "the user id of the admin whose key it is: "
                                "revoked when they are removed or stop being an admin (null: "
                                "issued by the CLI, or before keys were tied to a person)",
                            },
                        }
                    ),
                }
            }
        ),
        "ConnectionList": obj(
            {
                "connections": {
                    "type": "array",
                    "items": obj(
                        {
                            "client_id": STRING,
                            "application": nullable(STRING),
                            "permissions": STRINGS,
                            "granted_by": STRING,
                        }
                    ),
                }
            }
        ),
        "EventPage": obj(
            {
                "events": {"type": "array", "items": ref("Event")},
                "next_after": nullable({"type": "integer"}),
            }
        ),
        "Event": event_schema(),
        **oauth_schemas(),
        **other_schemas(),
    }


def event_schema() -> Json:
    return obj(
        {
            "position": {"type": "integer", "minimum": 1},
            "stream": STRING,
            "version": {"type": "integer"},
            "type": STRING,
            "recorded_at": {"type": "string", "format": "date-time"},
            "actor": nullable(STRING),
            "request_id": nullable(STRING),
            "client_ip": nullable(STRING),
            "causation": nullable(STRING),
            "payload": {
                "type": "object",
                "description": "The event's fields; secrets only as hashes, password "
                "hashes redacted.",
            },
        }
    )


def oauth_schemas() -> Json:
    creds = {
        "client_id": STRING,
        "client_secret": STRING,
        "client_assertion_type": {
            "const": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "description": "private_key_jwt (RFC 7523 §2.2), with client_assertion",
        },
        "client_assertion": {
            **STRING,
            "description": "a JWT signed with one of the application's keys: iss = sub = "
            "client_id, aud the issuer or the token endpoint, exp within an hour, a jti "
            "used once",
        },
    }
    open_strings: Json = {"additionalProperties": STRING}  # RFC 6749 §3.2: unknown ones ignored

    def grant(name: str, required: Json, optional: Json) -> Json:
        props = {"grant_type": {"const": name}} | required | optional | creds
        return {
            "type": "object",
            "properties": props,
            "required": ["grant_type", *required],
        } | open_strings

    return {
        "ClientCredentialsGrant": grant("client_credentials", {}, {"scope": STRING}),
        "AuthorizationCodeGrant": grant(
            "authorization_code",
            {"code": STRING, "redirect_uri": STRING},
            {"code_verifier": {**STRING, "description": "when PKCE (S256) was used"}},
        ),
        "RefreshTokenGrant": grant("refresh_token", {"refresh_token": STRING}, {"scope": STRING}),
        "TokenRequest": {
            "oneOf": [
                ref("ClientCredentialsGrant"),
                ref("AuthorizationCodeGrant"),
                ref("RefreshTokenGrant"),
            ],
            "discriminator": {"propertyName": "grant_type"},
        },
        "TokenResponse": obj(
            {"access_token": STRING, "token_type": {"enum": ["Bearer", "DPoP"]}, "scope": STRING},
            {
                "expires_in": {"type": "integer", "description": "authorization_code: 7200"},
                "refresh_token": STRING,
            },
        )
        | {
            "description": "client_credentials: no expires_in, no refresh_token. token_type "
            "DPoP: the token is bound to the key of the request's DPoP proof (RFC 9449 §5)."
        },
        "TokenParameter": {
            "type": "object",
            "properties": {"token": STRING, "token_type_hint": STRING} | creds,
            "required": ["token"],
        }
        | open_strings,
        "Introspection": {
            "oneOf": [
                obj({"active": {"const": False}}),
                obj(
                    {
                        "active": {"const": True},
                        "scope": STRING,
                        "client_id": STRING,
                        "token_type": {"enum": ["Bearer", "DPoP", "refresh_token"]},
                        "sub": STRING,
                        "company_id": STRING,
                    },
                    {
                        "exp": {"type": "integer"},
                        "iat": {"type": "integer"},
                        "iss": STRING,
                        "cnf": obj({"jkt": STRING})
                        | {"description": "a DPoP-bound token's key thumbprint (RFC 9449 §6.2)"},
                    },
                ),
            ]
        },
        "ServerMetadata": server_metadata_schema(),
    }


def server_metadata_schema() -> Json:
    urls = ("authorization_endpoint", "token_endpoint", "revocation_endpoint")
    lists = (
        "response_types_supported", "response_modes_supported", "grant_types_supported",
        "token_endpoint_auth_methods_supported", "revocation_endpoint_auth_methods_supported",
        "introspection_endpoint_auth_methods_supported", "code_challenge_methods_supported",
        "scopes_supported", "token_endpoint_auth_signing_alg_values_supported",
        "revocation_endpoint_auth_signing_alg_values_supported",
        "introspection_endpoint_auth_signing_alg_values_supported",
        "dpop_signing_alg_values_supported",
    )  # fmt: skip
    fields = {"issuer": STRING, "introspection_endpoint": STRING}
    fields |= {name: STRING for name in urls} | {name: STRINGS for name in lists}
    fields["authorization_response_iss_parameter_supported"] = {"const": True}  # RFC 9207
    return obj(fields)


def other_schemas() -> Json:
    projection = obj(
        {"name": STRING, "lag_events": {"type": "integer"}, "lag_seconds": {"type": "number"}}
    )
    return {
        "Session": obj(
            {
                "user_id": STRING,
                "company_id": STRING,
                "role": {"enum": ["admin", "member"]},
                "csrf_token": {**STRING, "description": "send as X-CSRF-Token on changes"},
            }
        ),
        "CompanyChoice": obj(
            {
                "error": {"const": "company_required"},
                "error_description": STRING,
                "companies": {
                    "type": "array",
                    "items": obj({"company_id": STRING, "name": STRING}),
                    "minItems": 2,
                },
            }
        ),
        "PolicyDecision": obj(
            {
                "allow": {"const": True},
                "company_id": STRING,
                "client_id": STRING,
                "permissions": STRINGS,
                "expires_at": nullable({"type": "integer"}),
            },
            {"dpop_nonce": DPOP_NONCE},
        ),
        "PolicyRefusal": obj(
            {"error": STRING, "error_description": STRING}, {"dpop_nonce": DPOP_NONCE}
        )
        | {
            "description": "Error, and with use_dpop_nonce the nonce the client is to put in "
            "its next proof (RFC 9449 §9)."
        },
        "WhoAmI": obj(
            {
                "company_id": STRING,
                "client_id": STRING,
                "permissions": STRINGS,
                "expires_at": nullable({"type": "string", "format": "date-time"}),
            }
        ),
        "Health": obj({"status": {"const": "ok"}}),
        "Readiness": obj(
            {
                "status": {"enum": ["ready", "not_ready"]},
                "projections": {"type": "array", "items": projection},
            },
            {"reasons": STRINGS},
        ),
        "Home": obj({"service": {"const": "tollgate"}, "links": {"type": "object"}}),
    }


DPOP_NONCE = {
    **STRING,
    "description": "DPOP_NONCE=required, dpop_proof sent: the nonce for the resource server to "
    "send its client in a DPoP-Nonce header (RFC 9449 §9)",
}


# --- responses and headers ------------------------------------------------------------------


def header(schema: Json, description: str, *, required: bool = True) -> Json:
    return {"description": description, "required": required, "schema": schema}


NO_STORE_HEADER = header({"const": "no-store"}, "responses with secrets or tokens: never cached")
ETAG = header(
    {"type": "string", "pattern": '^"[0-9]+"$'}, "the application's version; send it as If-Match"
)
RETRY_AFTER = header({"type": "string", "pattern": "^[0-9]+$"}, "seconds until a retry may work")


def challenge(scheme: str) -> Json:
    return header({"type": "string", "pattern": f"^{scheme} "}, f"RFC 6750/7235 {scheme} challenge")


def error(description: str, headers: Json | None = None, media: str = JSON) -> Json:
    response: Json = {"description": description, "content": {media: {"schema": ref("Error")}}}
    if headers:
        response["headers"] = headers
    return response


def oauth_error(description: str, extra: Json | None = None) -> Json:
    headers = {"Cache-Control": NO_STORE_HEADER, "Pragma": header({"const": "no-cache"}, "")}
    return error(description, headers | (extra or {}))


def common_responses() -> Json:
    bearer = {"WWW-Authenticate": challenge("Bearer")}
    return {
        "BadRequest": error("invalid_request: a malformed body, parameter or field"),
        "AdminUnauthorized": error(
            "no, malformed, unknown or revoked admin key or session", bearer
        ),
        "AdminForbidden": error("a member, not an admin; or a session change without X-CSRF-Token"),
        "NotFound": error("not_found: none such in the caller's company (never 403)"),
        "PreconditionFailed": error("precondition_failed: If-Match names an older version"),
        "Conflict": error("conflict: the resource exists already"),
        "StillChanging": error(
            "conflict: changed by others at every attempt, and no If-Match was sent; retry",
            {"Retry-After": header({"type": "string", "pattern": "^[0-9]+$"}, "seconds")},
        ),
        "PayloadTooLarge": error("request_too_large: the body is over 64 KiB"),
        "UnsupportedMediaType": error("unsupported_media_type: the body must be JSON"),
        "Unavailable": error("temporarily_unavailable: the database is unreachable; retry"),
        "OAuthBadRequest": oauth_error(
            "invalid_request, invalid_grant, unauthorized_client, unsupported_grant_type or "
            "invalid_scope (RFC 6749 §5.2); invalid_client for a client that authenticated "
            "in the body (a secret, an assertion or a public client's client_id)"
        ),
        "InvalidClient": oauth_error(
            "invalid_client for Basic credentials or none (401, Basic challenge); at "
            "introspection, an unknown resource-server key is invalid_token with a Bearer "
            "challenge",
            {"WWW-Authenticate": challenge("(Basic|Bearer)")},
        ),
        "IpNotAllowed": oauth_error("ip_not_allowed: the caller's address is not allow-listed"),
        "OAuthUnavailable": oauth_error("temporarily_unavailable"),
        "TokenUnauthorized": error("invalid_token (RFC 6750 §3.1)", bearer),
        "TokenForbidden": error(
            "ip_not_allowed (the token is revoked) or insufficient_scope", bearer
        ),
    }


def use(*names: str) -> Json:
    codes = {
        "BadRequest": "400", "OAuthBadRequest": "400", "AdminUnauthorized": "401",
        "InvalidClient": "401", "TokenUnauthorized": "401", "AdminForbidden": "403",
        "IpNotAllowed": "403", "TokenForbidden": "403", "NotFound": "404", "Conflict": "409",
        "StillChanging": "409",
        "PreconditionFailed": "412", "PayloadTooLarge": "413", "UnsupportedMediaType": "415",
        "Unavailable": "503", "OAuthUnavailable": "503",
    }  # fmt: skip
    return {codes[n]: {"$ref": f"#/components/responses/{n}"} for n in names}


def ok(schema: str, description: str, *, status: str = "200", headers: Json | None = None) -> Json:
    response: Json = {"description": description, "content": {JSON: {"schema": ref(schema)}}}
    if headers:
        response["headers"] = headers
    return {status: response}


def json_body(schema: str) -> Json:
    return {"required": True, "content": {JSON: {"schema": ref(schema)}}}


def html(description: str) -> Json:
    return {"description": description, "content": {HTML: {"schema": STRING}}}


def redirect(description: str) -> Json:
    return {"description": description, "headers": {"Location": header(STRING, "where to go")}}


def form_body(fields: tuple[str, ...]) -> Json:
    schema = {"type": "object", "properties": dict.fromkeys(fields, STRING)}
    # Every field may be missing (the page answers with the form again), the body too.
    return {"required": False, "content": {FORM: {"schema": schema}}}


CLIENT_ID = {"name": "client_id", "in": "path", "required": True, "schema": STRING}
ADMIN_ERRORS = ("AdminUnauthorized", "AdminForbidden", "Unavailable")
BODY_ERRORS = ("BadRequest", "PayloadTooLarge", "UnsupportedMediaType")


def op(summary: str, responses: Json, *, tag: str, **more: Any) -> Json:
    operation_id = more.pop("operationId")
    return (
        {"tags": [tag], "summary": summary, "operationId": operation_id}
        | more
        | {"responses": dict(sorted(responses.items()))}
    )


SECURITY_SCHEMES: Json = {
    "adminKey": {"type": "http", "scheme": "bearer", "bearerFormat": "tgadm_…",
                 "description": "an admin key (`tollgate company create`, POST /admin/keys)"},
    "session": {"type": "apiKey", "in": "cookie", "name": "tg_session",
                "description": "the browser session from POST /session"},
    "csrf": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token",
             "description": "the session's csrf_token; required with the session on changes"},
    "clientBasic": {"type": "http", "scheme": "basic",
                    "description": "client_id:client_secret, each form-urlencoded first"},
    "resourceServerKey": {"type": "http", "scheme": "bearer", "bearerFormat": "tgrs_…",
                          "description": "`tollgate resource-server create NAME`"},
    "accessToken": {"type": "http", "scheme": "bearer",
                    "description": "an access token from /oauth/token"},
}  # fmt: skip
