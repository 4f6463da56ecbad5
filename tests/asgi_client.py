"""A raw ASGI client for in-process tests that need exact headers."""

from __future__ import annotations

import asyncio

from test_frontend_app import Response

JSON = (b"content-type", b"application/json")


async def call(app, method: str, path: str, body: bytes = b"", headers=(JSON,)) -> Response:
    """One raw ASGI request with exactly `headers`; the client stays until the response ends."""
    resp = Response(0, {})
    done = asyncio.Event()
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(msg):
        if msg["type"] == "http.response.start":
            resp.status = msg["status"]
            resp.headers = {k.decode(): v.decode() for k, v in msg["headers"]}
        else:
            resp.chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                done.set()

    scope = {"type": "http", "method": method, "path": path, "headers": list(headers), "query_string": b""}
    await asyncio.wait_for(app(scope, receive, send), 30)
    return resp
