"""The running service against its own OpenAPI document: schemathesis sends every
operation generated requests, valid and invalid, and no answer may be a 5xx or one the
document does not describe (status, content type, headers, body schema)."""

from __future__ import annotations

import itertools
from base64 import b64encode
from urllib.parse import quote_plus

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from tests.contract.conftest import Live
from tests.contract.openapi_document import PATH

pytestmark = pytest.mark.contract

# The shipped file, not the builder: what users download is what is held to the service.
schema = schemathesis.openapi.from_path(PATH)
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], allow_x00=True
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
    unsupported_method,
]
# Left out: positive_data_acceptance. The schemas say what the service decodes; the domain
# rules (a name of 1-100 characters, a known permission, a reachable redirect URI) refuse
# much of what is schema-valid, with a documented 400.

_turn = itertools.count()


def credentials(case: schemathesis.Case, live: Live) -> dict[str, str]:
    """Each operation's own caller: the fuzzer tests what lies behind authentication."""
    path = case.operation.path
    if path.startswith("/admin/"):
        return {"Authorization": f"Bearer {live.admin_key}"}
    if path in ("/oauth/introspect", "/policy/check"):
        return {"Authorization": f"Bearer {live.resource_server_key}"}
    if path == "/api/v1/whoami":
        return {"Authorization": f"Bearer {live.access_token}"}
    if path in ("/oauth/token", "/oauth/revoke"):
        # RFC 6749 §2.3.1: each part form-urlencoded before base64.
        pair = f"{quote_plus(live.client_id)}:{quote_plus(live.client_secret)}"
        return {"Authorization": "Basic " + b64encode(pair.encode()).decode()}
    return {}


def aim_at_real_application(case: schemathesis.Case, live: Live) -> None:
    """Every other case names a real application, so reads, changes, rotations and the
    deletion get past the 404 and into the rules (the application is one made for this)."""
    if (case.path_parameters or {}).get("client_id") is not None and next(_turn) % 2:
        case.path_parameters["client_id"] = live.target_client_id


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_is_one_the_document_describes(case: schemathesis.Case, live: Live) -> None:
    aim_at_real_application(case, live)
    case.call_and_validate(
        base_url=live.url, headers=credentials(case, live), checks=CHECKS, timeout=30
    )
