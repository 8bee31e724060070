"""Builds service/web/openapi.json, the OpenAPI 3.1 document of Tollgate's HTTP interface.

The request schemas come from the handlers' own msgspec Structs (their limits, Literal
values and `forbid_unknown_fields` as `additionalProperties: false`) and the event types
from the event catalogue, so those parts cannot drift; the responses are written here.
After a change to a route, a Struct or this file:

    .venv/bin/python -m tests.contract.openapi_document

tests/e2e/test_openapi_served.py fails while the checked-in file differs from `build()`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from service import events as ev
from service.audit.history import MAX_LIMIT, MAX_POSITION, MAX_STREAM_LENGTH
from tests.contract.openapi_components import (
    ADMIN,
    ADMIN_ERRORS,
    ADMIN_READ,
    BODY_ERRORS,
    CLIENT,
    CLIENT_ID,
    ETAG,
    HTML,
    JSON,
    NO_STORE_HEADER,
    OAUTH_BODIES,
    RETRY_AFTER,
    SECURITY_SCHEMES,
    STRING,
    Json,
    challenge,
    common_responses,
    error,
    form_body,
    header,
    html,
    json_body,
    obj,
    ok,
    op,
    redirect,
    ref,
    request_schemas,
    response_schemas,
    use,
)

PATH = Path(__file__).resolve().parents[2] / "service" / "web" / "openapi.json"

# --- paths -----------------------------------------------------------------------------------


def application_paths() -> Json:
    tag = "applications"
    etag = {"ETag": ETAG}
    return {
        "/admin/applications": {
            "post": op(
                "Register an application; its client_secret is shown here only",
                ok(
                    "CreatedApplication",
                    "created",
                    status="201",
                    headers=etag | {"Cache-Control": NO_STORE_HEADER},
                )
                | use(*BODY_ERRORS, *ADMIN_ERRORS),
                tag=tag,
                operationId="createApplication",
                security=ADMIN,
                requestBody=json_body("ApplicationIn"),
            ),
            "get": op(
                "The caller company's applications, by name",
                ok("ApplicationList", "the applications") | use(*ADMIN_ERRORS),
                tag=tag,
                operationId="listApplications",
                security=ADMIN_READ,
            ),
        },
        "/admin/applications/{client_id}": {
            "parameters": [CLIENT_ID],
            "get": op(
                "One application",
                ok("Application", "the application", headers=etag) | use("NotFound", *ADMIN_ERRORS),
                tag=tag,
                operationId="getApplication",
                security=ADMIN_READ,
            ),
            "patch": op(
                "Change an application (not its grant_type)",
                ok("Application", "the changed application", headers=etag)
                | use(
                    *BODY_ERRORS, "NotFound", "PreconditionFailed", "StillChanging", *ADMIN_ERRORS
                ),
                tag=tag,
                operationId="patchApplication",
                security=ADMIN,
                parameters=[if_match()],
                requestBody=json_body("ApplicationPatchIn"),
            ),
            "delete": op(
                "Delete an application; its tokens and connections are revoked",
                {"204": {"description": "deleted"}}
                | use(
                    "BadRequest", "NotFound", "PreconditionFailed", "StillChanging", *ADMIN_ERRORS
                ),
                tag=tag,
                operationId="deleteApplication",
                security=ADMIN,
                parameters=[if_match()],
            ),
        },
        "/admin/applications/{client_id}/rotate-secret": {
            "parameters": [CLIENT_ID],
            "post": op(
                "A new client_secret; the old one is refused at once, issued tokens live on",
                ok(
                    "RotatedSecret",
                    "the new secret, shown here only",
                    headers={"Cache-Control": NO_STORE_HEADER},
                )
                | use(
                    "BadRequest", "NotFound", "PreconditionFailed", "StillChanging", *ADMIN_ERRORS
                ),
                tag=tag,
                operationId="rotateSecret",
                security=ADMIN,
                parameters=[if_match()],
            ),
        },
        "/admin/applications/{client_id}/keys": {
            "parameters": [CLIENT_ID],
            "get": op(
                "The public keys the application signs its client assertions with",
                ok("ClientKeyList", "the keys", headers=etag) | use("NotFound", *ADMIN_ERRORS),
                tag=tag,
                operationId="listClientKeys",
                security=ADMIN_READ,
            ),
            "post": op(
                "Register public keys (a JWK Set) beside the ones there; private keys are a 400",
                ok("ClientKeyList", "every key now registered", status="201", headers=etag)
                | use(*BODY_ERRORS, "NotFound", *ADMIN_ERRORS),
                tag=tag,
                operationId="addClientKeys",
                security=ADMIN,
                requestBody=json_body("JwksIn"),
            ),
        },
        "/admin/applications/{client_id}/keys/{kid}": {
            "parameters": [
                CLIENT_ID,
                {"name": "kid", "in": "path", "required": True, "schema": STRING},
            ],
            "delete": op(
                "Remove a key: assertions signed with it are refused from now on",
                {"204": {"description": "removed"}} | use("NotFound", *ADMIN_ERRORS),
                tag=tag,
                operationId="removeClientKey",
                security=ADMIN,
            ),
        },
    }


def if_match() -> Json:
    return {
        "name": "If-Match",
        "in": "header",
        "required": False,
        "description": 'The ETag of the version the change is based on, e.g. "3": a newer '
        "one answers 412. Anything but a version ETag is a 400.",
        "schema": {"type": "string", "pattern": '^(W/)?"?[0-9]+"?$'},
    }


def people_paths() -> Json:
    no_store = {"Cache-Control": NO_STORE_HEADER}
    key_id = {"name": "key_id", "in": "path", "required": True, "schema": STRING}
    return {
        "/admin/users": {
            "post": op(
                "Add a user (admin or member) to the company",
                ok("CreatedUser", "added", status="201", headers=no_store)
                | use(*BODY_ERRORS, "Conflict", *ADMIN_ERRORS),
                tag="users",
                operationId="createUser",
                security=ADMIN,
                requestBody=json_body("UserIn"),
            ),
            "get": op(
                "The company's users",
                ok("UserList", "the users") | use(*ADMIN_ERRORS),
                tag="users",
                operationId="listUsers",
                security=ADMIN_READ,
            ),
        },
        "/admin/keys": {
            "post": op(
                "Issue an admin key (shown here only)",
                ok("CreatedAdminKey", "issued", status="201", headers=no_store)
                | use(*BODY_ERRORS, *ADMIN_ERRORS),
                tag="keys",
                operationId="createAdminKey",
                security=ADMIN,
                requestBody=json_body("AdminKeyIn"),
            ),
            "get": op(
                "The company's admin keys",
                ok("AdminKeyList", "the keys") | use(*ADMIN_ERRORS),
                tag="keys",
                operationId="listAdminKeys",
                security=ADMIN_READ,
            ),
        },
        "/admin/keys/{key_id}": {
            "parameters": [key_id],
            "delete": op(
                "Revoke an admin key",
                {"204": {"description": "revoked"}} | use("NotFound", *ADMIN_ERRORS),
                tag="keys",
                operationId="revokeAdminKey",
                security=ADMIN,
            ),
        },
        "/admin/connections": {
            "get": op(
                "The applications connected to the company (the consents it gave)",
                ok("ConnectionList", "the connections") | use(*ADMIN_ERRORS),
                tag="connections",
                operationId="listConnections",
                security=ADMIN_READ,
            ),
        },
        "/admin/connections/{client_id}": {
            "parameters": [CLIENT_ID],
            "delete": op(
                "Revoke a connection: its tokens die with it",
                {"204": {"description": "revoked"}} | use("NotFound", *ADMIN_ERRORS),
                tag="connections",
                operationId="revokeConnection",
                security=ADMIN,
            ),
        },
        "/admin/events": {"get": events_operation()},
    }


def events_operation() -> Json:
    def query(name: str, schema: Json, description: str) -> Json:
        return {"name": name, "in": "query", "required": False, "schema": schema,
                "description": description + " (each at most once)"}  # fmt: skip

    parameters = [
        query("after", {"type": "integer", "minimum": 0, "maximum": MAX_POSITION},
              "events after this position: the previous page's next_after"),
        query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
              "at most this many events (default 100)"),
        query("type", {"enum": sorted(ev.BY_TAG)}, "only events of this type"),
        query("stream", {"type": "string", "minLength": 1, "maxLength": MAX_STREAM_LENGTH},
              "only events of this stream"),
    ]  # fmt: skip
    return op(
        "The company's own event history, in position order, page by page",
        ok("EventPage", "one page", headers={"Cache-Control": NO_STORE_HEADER})
        | use("BadRequest", *ADMIN_ERRORS),
        tag="history",
        operationId="listEvents",
        security=ADMIN_READ,
        parameters=parameters,
    )


def oauth_body(schema: str) -> Json:
    return {"required": True, "content": {media: {"schema": ref(schema)} for media in OAUTH_BODIES}}


ISSUER_PATH = {
    "name": "issuer_path",
    "in": "path",
    "required": True,
    "schema": STRING,
    "description": "the issuer's path, as PUBLIC_URL has it",
}


def oauth_paths() -> Json:
    no_store = {"Cache-Control": NO_STORE_HEADER, "Pragma": header({"const": "no-cache"}, "")}
    errors = ("OAuthBadRequest", "InvalidClient", "OAuthUnavailable")
    return {
        "/oauth/token": {
            "post": op(
                "Tokens for the client_credentials, authorization_code and refresh_token grants",
                ok("TokenResponse", "issued", headers=no_store | {"DPoP-Nonce": NONCE_HEADER})
                | use(*errors, "IpNotAllowed"),
                tag="oauth",
                operationId="token",
                security=CLIENT,
                requestBody=oauth_body("TokenRequest"),
                description="Client authentication by HTTP Basic (client_id and secret "
                "form-urlencoded first, RFC 6749 §2.3.1), client_id + client_secret in the "
                "body, or a signed client_assertion (private_key_jwt, RFC 7523 §2.2); exactly "
                "one. A secret rotated away is refused like a wrong one, and recorded. A DPoP "
                "header (RFC 9449 §4) binds the token to the proof's key (token_type DPoP); an "
                "invalid, replayed or (for dpop_bound_access_tokens) missing proof is 400 "
                "invalid_dpop_proof. With DPOP_NONCE=required, a proof without a nonce this "
                "server handed out (or with an expired one) is 400 use_dpop_nonce (RFC 9449 "
                "§8), and every answer to a request with a DPoP header names the nonce to use "
                "in a DPoP-Nonce header.",
            ),
        },
        "/oauth/revoke": {
            "post": op(
                "RFC 7009: 200 whether or not the token was known, live or this client's",
                {"200": {"description": "revoked, or nothing to revoke", "headers": no_store}}
                | use(*errors, "IpNotAllowed"),
                tag="oauth",
                operationId="revoke",
                security=CLIENT,
                requestBody=oauth_body("TokenParameter"),
            ),
        },
        "/oauth/introspect": {
            "post": op(
                "RFC 7662 introspection, for the token's own client or a resource server",
                ok("Introspection", "the token's state", headers=no_store)
                | use(*errors, "IpNotAllowed"),
                tag="oauth",
                operationId="introspect",
                security=[{"resourceServerKey": []}, *CLIENT],
                requestBody=oauth_body("TokenParameter"),
            ),
        },
        "/.well-known/oauth-authorization-server": {
            "get": op(
                "RFC 8414 server metadata; scopes_supported is the permission catalogue",
                ok("ServerMetadata", "the metadata"),
                tag="oauth",
                operationId="serverMetadata",
            ),
        },
        "/.well-known/oauth-authorization-server/{issuer_path}": {
            "get": op(
                "RFC 8414 §3.1: the same metadata, for an issuer (PUBLIC_URL) with a path; "
                "404 for any other path",
                ok("ServerMetadata", "the metadata") | use("NotFound"),
                tag="oauth",
                operationId="serverMetadataOfPath",
                parameters=[ISSUER_PATH],
            ),
        },
    }


NONCE_HEADER = header(
    {"type": "string"},
    "DPOP_NONCE=required, a DPoP request: the nonce for the next proof (RFC 9449 §8.2)",
    required=False,
)


def session_and_policy_paths() -> Json:
    policy_unauthorized = {
        "description": "invalid_token (RFC 6750 §3.1), invalid_dpop_proof or use_dpop_nonce "
        "(RFC 9449 §7.1, §9)",
        "content": {JSON: {"schema": ref("PolicyRefusal")}},
        "headers": {"WWW-Authenticate": challenge("(Bearer|DPoP)")},
    }
    throttled = error(
        "too_many_attempts: too many failed sign-ins for this address", {"Retry-After": RETRY_AFTER}
    )
    cookie = header(
        {"type": "string", "pattern": "^tg_session="},
        "the session cookie (HttpOnly, SameSite=Lax)",
    )
    choose = {
        "description": "invalid_request: a malformed body; or company_required: the password "
        "opens the address's accounts at several companies, listed in `companies` (only for "
        "the password's owner): send the same request again with company_id, one of them",
        "headers": {
            "Cache-Control": header({"const": "no-store"}, "with companies", required=False)
        },
        "content": {JSON: {"schema": {"oneOf": [ref("Error"), ref("CompanyChoice")]}}},
    }
    return {
        "/session": {
            "post": op(
                "Sign in for the admin API: a session cookie and its CSRF token",
                ok(
                    "Session",
                    "signed in",
                    headers={"Set-Cookie": cookie, "Cache-Control": NO_STORE_HEADER},
                )
                | use(*BODY_ERRORS, "Unavailable")
                | {
                    "400": choose,
                    "401": error("invalid_credentials: wrong email or password"),
                    "429": throttled,
                },
                tag="session",
                operationId="signIn",
                requestBody=json_body("LoginIn"),
            ),
            "delete": op(
                "Sign out: the session ends",
                {"204": {"description": "signed out"}} | use("Unavailable"),
                tag="session",
                operationId="signOut",
            ),
        },
        "/policy/check": {
            "post": op(
                "The gateway's decision, for resource servers that do not sit behind it",
                ok("PolicyDecision", "allowed")
                | use(*BODY_ERRORS, "TokenForbidden", "Unavailable")
                | {"401": policy_unauthorized},
                tag="policy",
                operationId="policyCheck",
                security=[{"resourceServerKey": []}],
                requestBody=json_body("CheckIn"),
                description="401: no or an unknown resource-server key, or an unknown, "
                "expired or revoked access token, or a DPoP-bound token without a valid proof "
                "(WWW-Authenticate: DPoP); with DPOP_NONCE=required, a proof without a "
                "valid nonce is 401 use_dpop_nonce with the nonce to relay (dpop_nonce). 403: "
                "the address is outside the application's allow list (the token is revoked) or "
                "the permission is missing. 400: a permission that is not one of the "
                "catalogue's (scopes_supported), decided before the token is.",
            ),
        },
        "/api/v1/whoami": {
            "get": op(
                "The gateway's own endpoint (with or without UPSTREAM_URL): who the token is",
                ok("WhoAmI", "the token's company, client, permissions and expiry")
                | use("TokenUnauthorized", "TokenForbidden", "Unavailable"),
                tag="gateway",
                operationId="whoami",
                security=[{"accessToken": []}],
                description="Every /api/{path} goes through the gateway: the token, the "
                "allow list and the route's permission are checked, then the request is "
                "proxied to UPSTREAM_URL; only this path is Tollgate's own. A method or path "
                "that no route rule covers is refused (403 insufficient_scope).",
            ),
        },
    }


def ops_paths() -> Json:
    metrics_types = ("text/plain", "application/openmetrics-text")
    readiness = {
        "content": {JSON: {"schema": ref("Readiness")}},
        "headers": {"Cache-Control": NO_STORE_HEADER},
    }
    return {
        "/healthz": {
            "get": op(
                "Liveness", ok("Health", "the process is up"), tag="ops", operationId="healthz"
            ),
        },
        "/readyz": {
            "get": op(
                "Readiness: the database answers and the projections are caught up",
                {
                    "200": {"description": "ready"} | readiness,
                    "503": {"description": "not ready, with the reasons"} | readiness,
                },
                tag="ops",
                operationId="readyz",
            ),
        },
        "/metrics": {
            "get": op(
                "Prometheus metrics (OpenMetrics when Accept asks for it)",
                {
                    "200": {
                        "description": "the exposition",
                        "content": {t: {"schema": STRING} for t in metrics_types},
                    }
                },
                tag="ops",
                operationId="metrics",
            ),
        },
        "/openapi.json": {
            "get": op(
                "This document",
                {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {JSON: {"schema": {"type": "object"}}},
                    }
                },
                tag="ops",
                operationId="openapi",
            ),
        },
    }


def page(summary: str, responses: Json, operation_id: str, **more: Any) -> Json:
    """A page a person uses: HTML, except that an unreadable body or the database being away
    is answered in JSON like everywhere else."""
    return op(summary, responses | use("Unavailable"), tag="pages", operationId=operation_id,
              **more)  # fmt: skip


def page_paths() -> Json:
    form_errors = {
        "400": {
            "description": "an error page, or JSON for an unreadable body",
            "content": {HTML: {"schema": STRING}, JSON: {"schema": ref("Error")}},
        },
        "413": {"$ref": "#/components/responses/PayloadTooLarge"},
    }
    sign_in = form_errors | {
        "401": html("wrong email or password: the form again"),
        "403": html("the form expired (its CSRF cookie is missing)"),
        "429": html("too many failed sign-ins"),
    }
    several = "the password opens the address's accounts at several companies"
    authorize = ("client_id", "redirect_uri", "response_type", "scope", "state",
                 "code_challenge", "code_challenge_method", "dpop_jkt")  # fmt: skip
    query = [{"name": n, "in": "query", "required": False, "schema": STRING} for n in authorize]
    home = {HTML: {"schema": STRING}, JSON: {"schema": ref("Home")}}
    back = redirect("an error, to a signed-in user's application")
    consent = {"302": redirect("back to the application"), "401": html("signed out"),
               "403": html("the form expired")}  # fmt: skip
    return {
        "/": {"get": op("Where a person lands; JSON links for programs",
                        {"200": {"description": "the page, or links", "content": home}},
                        tag="pages", operationId="home")},
        "/oauth/authorize": {
            "get": page("Sign-in, then the consent page (RFC 6749 §4.1.1)",
                        form_errors | {"200": html("the sign-in or consent page"), "302": back},
                        "authorize", parameters=query),
            "post": page("The consent decision: 302 to the redirect_uri with a code or an error",
                         form_errors | consent, "decide",
                         requestBody=form_body((*authorize, "csrf_token", "decision"))),
        },
        "/oauth/login": {
            "get": page("Where a failed sign-in leaves the browser: a page that sends the user "
                        "back to the application", {"200": html("the way back")},
                        "authorizeSignInAgain"),
            "post": page("The consent flow's sign-in form",
                         sign_in | {"303": redirect("back to the authorization request, or to "
                                                    "/sign-in/choose: " + several)},
                         "authorizeSignIn",
                         requestBody=form_body(("email", "password", "next", "csrf_token"))),
        },
        "/dashboard": {
            "get": page("The company admins' dashboard, or its sign-in form",
                        {"200": html("the dashboard or the sign-in form"),
                         "403": html("admins only")}, "dashboard"),
        },
        "/dashboard/login": {
            "get": page("Where a failed sign-in leaves the browser: to the dashboard's form",
                        {"303": redirect("to the dashboard")}, "dashboardSignInAgain"),
            "post": page("The dashboard's sign-in form",
                         sign_in | {"303": redirect("to the dashboard, or to /sign-in/choose: "
                                                    + several)}, "dashboardSignIn",
                         requestBody=form_body(("email", "password", "csrf_token"))),
        },
        "/sign-in/choose": {
            "get": page("The choice of company, when the password opened the address's "
                        "accounts at several (the sign-in waits, keyed by its cookie)",
                        {"200": html("one button per company"),
                         "400": html("no such choice: expired, or made already")},
                        "signInChoice"),
            "post": page("The company chosen: a session for its account, then on where the "
                         "sign-in was going; the choice is used up",
                         form_errors | {"303": redirect("where the sign-in was going"),
                                        "403": html("the form's token is not the choice's")},
                         "signInChoose", requestBody=form_body(("company_id", "csrf_token"))),
        },
        "/dashboard/logout": {
            "post": page("Sign out of the dashboard",
                         form_errors | {"303": redirect("to the dashboard"),
                                        "403": html("a live session, and the form's token is "
                                                    "not its own: it stays signed in")},
                         "dashboardSignOut",
                         requestBody=form_body(("csrf_token",))),
        },
    }  # fmt: skip


# --- the dashboard's pages and forms (HTML; every form POST needs the session's csrf_token) --


def dashboard_paths() -> Json:
    """GET pages answer 200 (or the sign-in form), 403 for members, 404 for what is not the
    company's; a form POST answers 303 back to a page, the form again with its error (400),
    or 403 (no session, a member, or not the session's CSRF token)."""
    shown = {"200": html("the page, or the sign-in form"), "403": html("admins only"),
             "404": html("not this company's")}  # fmt: skip
    done = {"303": redirect("back to the page, which says what happened"),
            "400": {"description": "the form again with what is wrong, or JSON for an "
                    "unreadable body", "content": {HTML: {"schema": STRING},
                                                    JSON: {"schema": ref("Error")}}},
            "403": html("no session, a member, or the form's token is not the session's"),
            "404": html("not this company's"), "409": html("a conflict (the last admin...)"),
            "412": html("changed meanwhile"),
            "413": {"$ref": "#/components/responses/PayloadTooLarge"}}  # fmt: skip
    client_id = {"parameters": [CLIENT_ID]}
    user_id = {"parameters": [{"name": "user_id", "in": "path", "required": True,
                               "schema": STRING}]}  # fmt: skip
    key_id = {"parameters": [{"name": "key_id", "in": "path", "required": True,
                              "schema": STRING}]}  # fmt: skip
    app_fields = ("csrf_token", "name", "grant_type", "redirect_uri", "ip_allowlist",
                  "permissions", "notification_emails")  # fmt: skip

    def get(summary: str, operation_id: str, **more: Any) -> Json:
        return {"get": page(summary, shown, operation_id, **more)}

    def post(summary: str, operation_id: str, fields: tuple[str, ...] = ()) -> Json:
        body = form_body(("csrf_token", *fields))
        return {"post": page(summary, done, operation_id, requestBody=body)}

    history_query = [{"name": n, "in": "query", "required": False, "schema": STRING}
                     for n in ("type", "application", "since", "until", "before")]  # fmt: skip
    base = "/dashboard/applications/{client_id}"
    return {
        "/dashboard/applications": get("The company's applications", "dashboardApplications")
        | post("Create an application; its secret is shown once", "dashboardCreateApplication",
               app_fields),
        "/dashboard/applications/new": get("The new-application form", "dashboardNewApplication"),
        base: client_id | get("One application: settings, secret, tokens, violations",
                              "dashboardApplication")
        | post("Change an application", "dashboardEditApplication", (*app_fields, "version")),
        base + "/rotate-secret": client_id | post("A new client secret, shown once",
                                                  "dashboardRotateSecret"),
        base + "/revoke-tokens": client_id | post("Revoke every token of the application",
                                                  "dashboardRevokeTokens"),
        base + "/client-auth": client_id | post(
            "Change how the application authenticates: method, DPoP, live-token limit",
            "dashboardClientAuth", ("token_endpoint_auth_method", "dpop_bound_access_tokens",
                                    "cc_token_limit", "version")),
        base + "/keys": client_id | post("Add public keys, pasted as a JWK or a JWK Set",
                                         "dashboardAddClientKeys", ("jwks",)),
        base + "/keys/remove": client_id | get(
            "Confirm removing a public key", "dashboardConfirmRemoveClientKey",
            parameters=[{"name": "kid", "in": "query", "required": False, "schema": STRING,
                         "description": "the key to remove (without a session: the sign-in "
                         "page, whatever the query)"}])
        | post("Remove a public key", "dashboardRemoveClientKey", ("kid",)),
        base + "/delete": client_id | get("Confirm deleting an application",
                                          "dashboardConfirmDelete")
        | post("Delete an application", "dashboardDeleteApplication"),
        "/dashboard/connections": get("Connections: to this company, and to its applications",
                                      "dashboardConnections"),
        "/dashboard/connections/{client_id}/revoke": client_id | post(
            "Revoke a connection", "dashboardRevokeConnection"),
        "/dashboard/people": get("The company's users", "dashboardPeople")
        | post("Add a user (a generated password is shown once)", "dashboardAddPerson",
               ("email", "role", "password")),
        "/dashboard/people/{user_id}/role": user_id | post("Change a user's role",
                                                           "dashboardChangeRole", ("role",)),
        "/dashboard/people/{user_id}/reset-password": user_id | post(
            "A new password for a user, shown once", "dashboardResetPassword"),
        "/dashboard/people/{user_id}/remove": user_id | get("Confirm removing a user",
                                                            "dashboardConfirmRemove")
        | post("Remove a user", "dashboardRemovePerson"),
        "/dashboard/keys": get("The company's admin keys", "dashboardKeys")
        | post("Issue an admin key, shown once", "dashboardIssueKey", ("label",)),
        "/dashboard/keys/{key_id}/revoke": key_id | post("Revoke an admin key",
                                                         "dashboardRevokeKey"),
        "/dashboard/history": {"get": page(
            "The company's events: filtered, newest first, a page at a time",
            shown | {"400": html("a filter that cannot be used, named")}, "dashboardHistory",
            parameters=history_query)},
        # the signed-in user's own: members' too
        "/dashboard/password": {
            "get": page("Your own password: the form (any signed-in user, members too)",
                        {"200": html("the form, or the sign-in form")}, "dashboardPasswordForm"),
            "post": page(
                "Change your own password, proving the current one; every other session of "
                "yours ends, and this browser gets a new one",
                {k: v for k, v in done.items() if k not in ("404", "412")}
                | {"400": html("the form again: the new password too easy to guess, "
                                    "the same as the current one, or its confirmation differs"),
                        "403": html("the current password is wrong, no session, or the "
                                    "form's token is not the session's"),
                        "409": html("the password was changed meanwhile"),
                        "429": html("too many attempts: the form again, saying when")},
                "dashboardChangePassword",
                requestBody=form_body(("csrf_token", "current_password", "new_password",
                                       "confirm_password"))),
        },
    }  # fmt: skip


# --- users' lifecycle, the kill switch, the consent page's "Not you?" ------------------------


def lifecycle_paths() -> Json:
    no_store = {"Cache-Control": NO_STORE_HEADER}
    user_id = {"parameters": [{"name": "user_id", "in": "path", "required": True,
                               "schema": STRING}]}  # fmt: skip
    last_admin = {
        "409": error(
            "last_admin: the company's last admin stays one; or conflict: its users changed "
            "at every attempt (Retry-After: 1)"
        )
    }
    optional = {"required": False, "content": {JSON: {"schema": ref("ResetPasswordIn")}}}
    cookie = header({"type": "string", "pattern": "^tg_session="}, "the new session's cookie")
    return {
        "/admin/users/{user_id}": user_id | {
            "patch": op("Change a user's role", ok("User", "the user, changed")
                        | use(*BODY_ERRORS, "NotFound", *ADMIN_ERRORS)
                        | last_admin, tag="users", operationId="changeRole", security=ADMIN,
                        requestBody=json_body("RoleIn")),
            "delete": op("Remove a user: they cannot sign in, their sessions end everywhere",
                         {"204": {"description": "removed"}}
                         | use("NotFound", *ADMIN_ERRORS) | last_admin,
                         tag="users", operationId="removeUser", security=ADMIN),
        },
        "/admin/users/{user_id}/reset-password": user_id | {
            "post": op("A new password for a user (generated and shown once, or the one sent); "
                       "their sessions end", ok("PasswordReset", "reset", headers=no_store)
                       | use(*BODY_ERRORS, "NotFound", *ADMIN_ERRORS),
                       tag="users", operationId="resetPassword", security=ADMIN,
                       requestBody=optional),
        },
        "/admin/applications/{client_id}/revoke-tokens": {
            "parameters": [CLIENT_ID],
            "post": op("The kill switch: every live token of the application revoked; "
                       "client_id and secret kept", ok("TokensRevoked", "revoked")
                       | use("BadRequest", "NotFound", "PreconditionFailed", "StillChanging",
                             *ADMIN_ERRORS),
                       tag="applications", operationId="revokeTokens", security=ADMIN,
                       parameters=[if_match()]),
        },
        "/session/password": {
            "post": op("Change one's own password (the current one proves it): every session "
                       "of the user ends, the caller gets a new one",
                       ok("PasswordChanged", "changed",
                          headers={"Set-Cookie": cookie, "Cache-Control": NO_STORE_HEADER})
                       | use(*BODY_ERRORS, "AdminUnauthorized", "Unavailable")
                       | {"403": error("invalid_credentials: the current password is wrong; "
                                       "or no session, or no X-CSRF-Token"),
                          "409": error("conflict: the password changed meanwhile"),
                          "429": error("too_many_attempts", {"Retry-After": RETRY_AFTER})},
                       tag="session", operationId="changePassword",
                       security=[{"session": [], "csrf": []}],
                       requestBody=json_body("PasswordChangeIn")),
        },
        "/oauth/switch-user": {
            "post": page("The consent page's \"Not you?\": sign out, back to the same "
                         "authorization request", {"303": redirect("the authorization request"),
                                                   "403": html("the form expired"),
                                                   "413": {"$ref": "#/components/responses/PayloadTooLarge"},
                                                   "400": {"description": "JSON for an unreadable body",
                                                           "content": {JSON: {"schema": ref("Error")}}}},
                         "switchUser", requestBody=form_body(("next", "csrf_token"))),
        },
    }  # fmt: skip


def lifecycle_schemas() -> Json:
    from service.web.admin import ResetPasswordIn, RoleIn
    from service.web.login import PasswordChangeIn

    _, requests = msgspec.json.schema_components(
        [RoleIn, ResetPasswordIn, PasswordChangeIn], ref_template="#/components/schemas/{name}"
    )
    requests["ResetPasswordIn"]["description"] = "No body, or no password: one is generated."
    return dict(requests) | {
        "PasswordReset": obj({"user_id": STRING},
                             {"password": {**STRING, "description": "generated: shown once"}}),
        "TokensRevoked": obj({"client_id": STRING, "revoked": {
            "type": "integer", "minimum": 0,
            "description": "live grants ended: a refresh-token family counts once, as does "
                           "each client_credentials token"}}),
        "PasswordChanged": obj({"user_id": STRING, "csrf_token": STRING}),
    }  # fmt: skip


def build() -> Json:
    paths: Json = {}
    for part in (application_paths, people_paths, oauth_paths, session_and_policy_paths,
                 ops_paths, page_paths, dashboard_paths, lifecycle_paths):  # fmt: skip
        paths |= part()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tollgate",
            "version": "0.1.0",
            "description": "An event-sourced OAuth 2.0 token and policy service. Errors are "
            'JSON {"error", "error_description"} everywhere; a method a path does not take '
            "is 405 with Allow.",
        },
        "paths": paths,
        "components": {
            "schemas": request_schemas() | response_schemas() | lifecycle_schemas(),
            "responses": common_responses(),
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    PATH.write_text(render(), encoding="utf-8")
    print(f"wrote {PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
