"""Request bodies are bounded before anything reads them (hostile tester: a 50 MB incident body was parsed)."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from broker_config.web import MAX_BODY_BYTES, BodyLimitMiddleware


def _app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(BodyLimitMiddleware)

    @app.post("/echo")
    async def echo(body: dict[str, str]) -> dict[str, int]:
        return {"keys": len(body)}

    return app


async def test_large_declared_and_streamed_bodies_get_413_small_ones_pass() -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/echo", json={"a": "b"})).status_code == 200
        big = b'{"a": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
        resp = await client.post("/echo", content=big, headers={"content-type": "application/json"})
        assert resp.status_code == 413
        assert len(resp.content) < 100

        async def chunks():  # no Content-Length: a streamed body that grows past the bound
            for _ in range(20):
                yield b"x" * (MAX_BODY_BYTES // 10)

        resp = await client.post("/echo", content=chunks(), headers={"content-type": "application/json"})
        assert resp.status_code == 413
