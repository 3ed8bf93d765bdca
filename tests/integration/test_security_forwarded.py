"""The client address a service sees (sign-in throttling, audit "from where") comes from the socket: a forged
``X-Forwarded-For`` from a local process must not name a new address on every attempt (hostile tester)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from broker_config.web import TRUSTED_PROXIES_ENV, server_config

pytestmark = pytest.mark.integration


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/whoami")
    async def whoami(request: Request) -> dict[str, str]:
        return {"client": request.client.host if request.client else ""}

    return app


@asynccontextmanager
async def _serving() -> AsyncIterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(server_config(_app(), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn offers only a flag
                await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_a_forged_forwarded_header_is_ignored_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRUSTED_PROXIES_ENV, raising=False)
    async with _serving() as base, httpx.AsyncClient() as client:
        seen = {(await client.get(f"{base}/whoami", headers={"X-Forwarded-For": f"10.0.0.{i}"})).json()["client"]
                for i in range(5)}  # fmt: skip
    assert seen == {"127.0.0.1"}


async def test_a_configured_proxy_is_believed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRUSTED_PROXIES_ENV, "127.0.0.1")
    async with _serving() as base, httpx.AsyncClient() as client:
        answer = await client.get(f"{base}/whoami", headers={"X-Forwarded-For": "10.0.0.7"})
    assert answer.json()["client"] == "10.0.0.7"
