"""`--api-key`: a bearer token on every route but the open ones, compared in constant time.

Only a digest of the key is kept. The key is compared digest to digest, so neither the
comparison's time nor its length check says anything about the key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from .protocol import ApiError

# Probes and documentation: a load balancer, Prometheus and a client generator need no key.
OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json"})


def invalid_api_key() -> ApiError:
    return ApiError(
        401,
        "Invalid or missing API key: send it as the header 'Authorization: Bearer <key>'.",
        error_type="invalid_request_error",
        code="invalid_api_key",
        headers=((b"www-authenticate", b"Bearer"),),
    )


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The token of the first Authorization header if its scheme is Bearer (any case)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


class ApiKey:
    """The key the server requires; `check` raises a 401 ApiError for a request without it."""

    def __init__(self, key: str):
        self._digest = hashlib.sha256(key.encode()).digest()

    def __repr__(self) -> str:
        return "ApiKey(<hidden>)"

    def check(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        token = bearer_token(headers)
        if token is None or not hmac.compare_digest(hashlib.sha256(token).digest(), self._digest):
            raise invalid_api_key()
