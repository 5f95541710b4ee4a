"""The ASGI layer every request passes first: request ids, bearer auth, body size and time limits, metrics,
version header.

It is plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which costs a task per request. The
body is read here, counting bytes as they stream in, so a client that lies in ``Content-Length`` or
sends chunks is stopped at the limit, one that stalls is answered 408 when the read times out, and the
app only ever sees a complete body within the limits.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from langops.prediction_records import is_safe_request_id, new_request_id
from langops.serving.metrics import ServerMetrics

VERSION_HEADER = "X-Model-Version"
ROLE_HEADER = "X-Model-Role"  # champion, or challenger for a canary's answer
REQUEST_ID_HEADER = "X-Request-Id"  # the client's id on the way in; the id the server issued on the way out
CLIENT_REQUEST_ID_HEADER = "X-Client-Request-Id"  # the client's own X-Request-Id, echoed when it was kept
MODEL_HEADERS = (VERSION_HEADER, ROLE_HEADER)  # what names the model: never sent to a caller without the token
DOCS_ASSETS = "/docs/assets"  # Swagger UI's scripts and styles, served by the server itself
ENDPOINTS = frozenset(
    {"/health", "/ready", "/version", "/metrics", "/predict", "/invocations", "/reload", "/openapi.json",
     "/docs", DOCS_ASSETS, "/ping", "/feedback", "/rollout"}
)
CLIENT_CLOSED = 499  # nginx's status for a client that went away before its request was read: not a server error
PUBLIC_PATHS = frozenset({"/health", "/ping"})  # liveness; /ping is the name MLflow clients poll
INVOCATIONS = "/invocations"


class ServingMiddleware:
    """Wraps the app; ``live_version()`` names the version for the ``X-Model-Version`` header.

    With a ``token``, a request without it gets 401 on every path but ``PUBLIC_PATHS``, and no answer it
    gets (``/health`` included) carries a header that names the model.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: ServerMetrics,
        live_version: Callable[[], str | None],
        token: str | None,
        max_body_bytes: int,
        body_read_timeout_s: float,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.live_version = live_version
        self._token = token.encode() if token else None
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout_s = body_read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        endpoint = _endpoint(path)
        status = 500
        request_id, client_request_id = new_request_id(), client_request_id_of(scope)
        state = scope.setdefault("state", {})
        state["request_id"], state["client_request_id"] = request_id, client_request_id
        authorized = self._token is None or self._authorized(scope)

        async def send_with_version(message: Message) -> None:
            """Records the status and names the request; names the live version, except to a caller without
            the token, who learns nothing about the model (not on /health, not on a 401, 404 or 405)."""
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                if client_request_id is not None:
                    headers[CLIENT_REQUEST_ID_HEADER] = client_request_id
                if not authorized:
                    for name in MODEL_HEADERS:
                        del headers[name]
                elif VERSION_HEADER not in headers and (version := self.live_version()) is not None:
                    headers.append(VERSION_HEADER, version)
            await send(message)

        try:
            if _both_framings(scope):
                await _reply(send_with_version, 400, path, "request has both Content-Length and Transfer-Encoding: "
                             "its length is ambiguous (RFC 9112, section 6.3); send one of them",
                             {"Connection": "close"})
                return
            if not authorized and path not in PUBLIC_PATHS:
                await _reply(send_with_version, 401, path, "missing or wrong bearer token: send "
                             "'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})
                return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                try:
                    body = await self._read_body(scope, receive, send_with_version)
                except ClientDisconnected:
                    status = CLIENT_CLOSED
                    return
                if body is None:
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_with_version)
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(elapsed)
            if status >= 400:
                self.metrics.errors.labels(endpoint, _error_kind(status)).inc()

    def _authorized(self, scope: Scope) -> bool:
        """``Authorization: Bearer <token>``, the scheme in any case (RFC 9110: schemes are case-insensitive),
        the token compared in constant time."""
        assert self._token is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.lstrip(b" "), self._token)
        return False

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None after answering 413 (declared or streamed size over the limit) or 408
        (the body did not arrive within ``body_read_timeout_s``; the connection is closed, so a client
        that declares more than it sends cannot hold it).

        Raises:
            ClientDisconnected: the client went away before its body was complete.
        """
        limit, path = self.max_body_bytes, scope["path"]
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _reply(send, 400, path, f"Content-Length is not a number: {value[:40]!r}")
                    return None
                if declared > limit:
                    await _reply(send, 413, path, f"request body is {declared} bytes; the limit is {limit} "
                                 "bytes (max_body_bytes)", {"Connection": "close"})
                    return None
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_read_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                await _reply(send, 408, path, f"request body timed out: not complete after {self.body_read_timeout_s} s, "
                             f"{size} bytes arrived (body_read_timeout_s)", {"Connection": "close"})
                return None
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _reply(send, 413, path, f"request body is over the limit of {limit} bytes "
                             "(max_body_bytes)", {"Connection": "close"})
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _both_framings(scope: Scope) -> bool:
    """A body framed two ways. A proxy in front that reads the other length than this server would see a
    different request (request smuggling); RFC 9112 lets a server refuse it, and it is refused here."""
    names = {name for name, _ in scope["headers"]}
    return b"content-length" in names and b"transfer-encoding" in names


def client_request_id_of(scope: Scope) -> str | None:
    """The client's ``X-Request-Id`` when it is a safe token (bounded length and charset), else None.

    It is kept beside the id the server issues, never instead of it: clients reuse and retry ids, so only
    the server's names one scored text. An unsafe id is dropped rather than refused: it would otherwise
    reach logs, CSV files and headers.
    """
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if len(value) <= 64:
                candidate = value.decode("latin-1")
                if is_safe_request_id(candidate):
                    return candidate
            break
    return None


class ClientDisconnected(Exception):
    """The client closed the connection before its request body was complete."""


def error_body(path: str, message: str, status: int) -> bytes:
    """``{"detail": ...}``, or MLflow's ``{"error_code", "message"}`` on ``/invocations``."""
    if path == INVOCATIONS:
        code = {401: "UNAUTHENTICATED", 413: "RESOURCE_LIMIT_EXCEEDED", 503: "TEMPORARILY_UNAVAILABLE"}
        return json.dumps({"error_code": code.get(status, "BAD_REQUEST"), "message": message}).encode()
    return json.dumps({"detail": message}).encode()


async def _reply(send: Send, status: int, path: str, message: str, headers: dict[str, str] | None = None) -> None:
    body = error_body(path, message, status)
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the buffered body once, then listens to the client again."""
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _endpoint(path: str) -> str:
    """The metrics label of a path: the endpoint itself, or ``other`` so that random paths cannot grow the labels."""
    if path in ENDPOINTS:
        return path
    return DOCS_ASSETS if path.startswith(DOCS_ASSETS + "/") else "other"


def _error_kind(status: int) -> str:
    return {401: "unauthorized", 408: "timeout", 413: "too_large", 429: "overloaded", CLIENT_CLOSED: "client_closed",
            503: "unavailable"}.get(status, "client_error" if status < 500 else "server_error")
