"""What keeps one client from taking the server from everyone else: a size limit on request bodies, and a
deadline by which a request must have arrived whole.

- `BodyLimit` (ASGI middleware) answers 413 to a body larger than `max_bytes`: at once when Content-Length
  says so, or as soon as a chunked body grows past it, before anything is parsed.
- `DeadlineProtocol` (uvicorn's h11 protocol, extended) closes a connection whose request head and body have
  not fully arrived `request_timeout` seconds after the connection opened or its previous response ended:
  idle and slow-sending ("slowloris") connections cannot pin the server's sockets. A request that has
  arrived is never cut off, however long its answer streams.
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

REQUEST_TIMEOUT_S = 15.0
MAX_BODY_BYTES = 8 * 2**20


class BodyLimit:
    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(send)
        seen, refused, started = 0, False, False

        async def limited_receive():
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # stop reading: to the app the client has gone
                    refused = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if refused and not started:
                return  # whatever the app answers to a cut-off body, the 413 below replaces it
            started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)
        if refused and not started:
            await self._too_large(send)

    async def _too_large(self, send) -> None:
        body = json.dumps({"error": {"message": f"the request body exceeds {self.max_bytes} bytes; send a "
                                                f"shorter prompt", "type": "invalid_request_error",
                                     "code": "request_too_large", "param": None}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class DeadlineProtocol(H11Protocol):
    """h11 with a deadline on receiving each request (see the module docstring)."""

    request_timeout = REQUEST_TIMEOUT_S

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._expire)

    def _disarm(self) -> None:
        handle = getattr(self, "_deadline", None)
        if handle is not None:
            handle.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        # IDLE: the request head is not complete; SEND_BODY: its body is not. Once the request has arrived
        # (DONE) the answer may take as long as it takes.
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()
