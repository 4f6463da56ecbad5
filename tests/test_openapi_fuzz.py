"""schemathesis against /openapi.json (issue 11): every operation the document describes, with
generated valid and invalid bodies, on a real server (`--model dummy`, so that only the HTTP layer
and the engine's bookkeeping run): no 5xx, no hang, every response's status, content type, headers
and body as the document says. (Not checked: that every schema-valid body is accepted. The range
checks of the sampling parameters live in SamplingParams, not in the document's schemas, so a
max_tokens of 0 is schema-valid and answered with a 400.)

Bounded in CI (LLA_FUZZ_EXAMPLES, default 15 per operation); a long local run:
    LLA_FUZZ_EXAMPLES=500 python -m pytest tests/test_openapi_fuzz.py
"""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from serverproc import ServerProcess  # noqa: E402

EXAMPLES = int(os.environ.get("LLA_FUZZ_EXAMPLES", "15"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--model", "dummy", "--max-model-len", "256", "--num-slots", "32")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case):
    case.call_and_validate(checks=CHECKS, timeout=30)
