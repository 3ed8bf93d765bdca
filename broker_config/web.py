"""HTTP pieces shared by the services' APIs (dispatch, board, crew screen): a bound on request bodies, and the one
sign-in page script (``static/login.js``) that dispatch's console and the ED board both serve.

A 50 MB JSON body was parsed and a 10 MB one echoed back three times over in a 422 (found by the hostile tester):
every request body is now bounded before anything reads it, with a plain 413.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

__all__ = ["BodyLimitMiddleware", "MAX_BODY_BYTES", "sign_in_script"]

MAX_BODY_BYTES = 256 * 1024
"""Largest request body accepted, bytes: the biggest legitimate one (a pre-alert with notes, an audit batch) is
far smaller."""


def sign_in_script() -> str:
    """The sign-in page's script (UTF-8 JavaScript): posts to the serving service's ``/api/auth/login`` and returns
    to the same-origin page named by ``?next=``."""
    return resources.files("broker_config").joinpath("static", "login.js").read_text(encoding="utf-8")


Scope = dict[str, Any]
Message = dict[str, Any]


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 for a declared ``Content-Length`` above the bound, and for a streamed body that
    grows past it (the app then sees a disconnect instead of the rest of the body)."""

    def __init__(self, app: Any, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_body_bytes
                except ValueError:
                    too_big = True
                if too_big:
                    await _reject(send)
                    return
        seen = 0
        responded = False

        async def bounded_receive() -> Message:
            nonlocal seen, responded
            message: Message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    if not responded:
                        responded = True
                        await _reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not responded:
                await send(message)

        await self.app(scope, bounded_receive, guarded_send)


async def _reject(send: Any) -> None:
    body = b'{"detail":"request body too large"}'
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
