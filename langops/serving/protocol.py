"""uvicorn's h11 protocol with a deadline on a request's line and headers.

uvicorn times a connection out only while it is idle between requests (``timeout_keep_alive``), and the
middleware's body timeout starts once the headers are complete. A client that sends its headers a byte a
second keeps the connection, its buffer and a slot of the server's file descriptors for as long as it likes;
thirty such clients held their connections for as long as they were watched. Here a request's headers must
arrive within ``header_read_timeout_s`` of its first byte: then the client gets 408 and the connection is
closed. The next request on a kept-alive connection gets a deadline of its own from its first byte.

The server names this class to uvicorn (``http=``), so it is used whether or not httptools is installed.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

HEADER_READ_TIMEOUT_S = 10.0  # params: deploy.header_read_timeout_s (serve() and each worker set it here)


class HeaderDeadlineProtocol(H11Protocol):
    """An h11 connection whose request line and headers must arrive within ``header_read_timeout_s``."""

    header_read_timeout_s: float = HEADER_READ_TIMEOUT_S

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is None and self._awaiting_request():
            self._header_deadline = self.loop.call_later(self.header_read_timeout_s, self._headers_too_slow)
        super().data_received(data)
        if self._header_deadline is not None and not self._awaiting_request():
            self._cancel_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._cancel_deadline()  # pipelined bytes of the next request already parsed get a fresh deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _awaiting_request(self) -> bool:
        """Waiting for (the rest of) a request's line and headers: no request of this connection in progress."""
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _cancel_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing() or not self._awaiting_request():
            return
        log.info("closed a connection from %s: its request headers were not complete after %.0f s",
                 "%s:%d" % self.client if self.client else "a client", self.header_read_timeout_s)
        body = (f'{{"detail": "request headers timed out: not complete after {self.header_read_timeout_s:g} s '
                f'(header_read_timeout_s)"}}').encode()
        # The partial request is abandoned: h11 cannot answer a request it never parsed, so the reply is raw.
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.transport.close()
