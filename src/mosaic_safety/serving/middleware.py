"""Pure ASGI middleware: a body-size limit enforced while reading, and per-endpoint metrics.

The body limit checks ``Content-Length`` first and then counts the bytes actually received (the
body is read here and replayed), so a chunked upload without a length cannot get past it either.
Metrics time a request to its last body byte, which for a streamed response is the end of generation.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .metrics import Metrics

Scope = dict[str, Any]


async def _send_error(send: Any, status: int, message: str, kind: str = "invalid_request_error") -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for bodies over ``max_bytes``; 400 for an unreadable Content-Length."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = f"request body exceeds the limit of {self.max_bytes} bytes"
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await _send_error(send, 400, "invalid Content-Length header")
                return
            if length > self.max_bytes:
                await _send_error(send, 413, too_big)
                return
        # Read the whole body here (bounded by the limit) and replay it: the app never sees more.
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.max_bytes:
                await _send_error(send, 413, too_big)
                return
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for a disconnect, as the server would

        await self.app(scope, replay, send)


CLIENT_CLOSED = 499  # nginx's status for a request its client closed before the answer: not a server error


class MetricsMiddleware:
    """Count requests by route and status, and time them to the last byte."""

    def __init__(self, app: Any, metrics: Metrics, routes: set[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in self.routes else "other"  # fuzzers must not explode label cardinality
        start = time.perf_counter()
        status = 500
        recorded = False

        async def timed_send(message: dict[str, Any]) -> None:
            nonlocal status, recorded
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and not recorded:
                recorded = True
                self.metrics.request(endpoint, status, time.perf_counter() - start)

        started = False

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await timed_send(message)

        try:
            await self.app(scope, receive, watched_send)
            if not started:  # the app returned without answering: the client hung up first
                status = CLIENT_CLOSED
        finally:
            if not recorded:
                self.metrics.request(endpoint, status, time.perf_counter() - start)
