"""HTTP pieces shared by the services' APIs (dispatch, board, crew screen): a bound on request bodies, the one
sign-in page script (``static/login.js``) that dispatch's console and the ED board both serve, and the one way the
services configure uvicorn (:func:`server_config`: client addresses from the socket unless a proxy is trusted).

A 50 MB JSON body was parsed and a 10 MB one echoed back three times over in a 422 (found by the hostile tester):
every request body is now bounded before anything reads it, with a plain 413.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Any

import uvicorn

__all__ = ["BodyLimitMiddleware", "MAX_BODY_BYTES", "TRUSTED_PROXIES_ENV", "server_config", "sign_in_script"]

TRUSTED_PROXIES_ENV = "EMS_HTTP_TRUSTED_PROXIES"
"""Comma-separated addresses of reverse proxies whose ``X-Forwarded-For`` is believed (empty: none)."""

MAX_BODY_BYTES = 256 * 1024
"""Largest request body accepted, bytes: the biggest legitimate one (a pre-alert with notes, an audit batch) is
far smaller."""


def sign_in_script() -> str:
    """The sign-in page's script (UTF-8 JavaScript): posts to the serving service's ``/api/auth/login`` and returns
    to the same-origin page named by ``?next=``."""
    return resources.files("broker_config").joinpath("static", "login.js").read_text(encoding="utf-8")


def server_config(app: Any, *, host: str | None = None, port: int | None = None, **options: Any) -> uvicorn.Config:
    """A uvicorn configuration for one of the services' apps (``options`` go to :class:`uvicorn.Config`).

    The client address (sign-in throttling, the audit trail's "from where") comes from the socket.  uvicorn's own
    default believes ``X-Forwarded-For`` from 127.0.0.1, so any local process or kiosk browser could name a new
    address on every attempt and slip past the per-address throttle (found by the hostile tester): forwarded
    headers are used only from the proxies listed in ``EMS_HTTP_TRUSTED_PROXIES``.
    """
    trusted = [a.strip() for a in os.environ.get(TRUSTED_PROXIES_ENV, "").split(",") if a.strip()]
    if host is not None:
        options["host"] = host
    if port is not None:
        options["port"] = port
    return uvicorn.Config(app, proxy_headers=bool(trusted), forwarded_allow_ips=",".join(trusted) or None, **options)


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
