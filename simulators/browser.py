"""Headless Chromium driven over the DevTools protocol: the one client the browser tests and the board benchmark use.

:func:`chromium` starts a fresh headless Chromium (a throw-away profile, DevTools on a free port, found from the
``DevTools listening on ws://...`` line it prints) and yields a :class:`DevTools` client on the browser's WebSocket.
Pages are driven through flattened target sessions (``Target.attachToTarget`` with ``flatten=True``): every command
names its ``sessionId``.  Protocol reference: https://chromedevtools.github.io/devtools-protocol/ (stable 1.3).

Needs the ``websockets`` package (the project's ``test`` extra); nothing in the services imports this module.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BASE_FLAGS",
    "KEEP_RENDERING_FLAGS",
    "DevTools",
    "PageError",
    "chromium",
    "chromium_binary",
]

BASE_FLAGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-first-run",
)
"""Headless, software rendering, no network chatter of its own (updates, sync), no first-run UI."""

KEEP_RENDERING_FLAGS: tuple[str, ...] = (
    "--disable-renderer-backgrounding",
    "--disable-background-timer-throttling",
    "--disable-backgrounding-occluded-windows",
)
"""Keep every page at full priority, its timers unthrottled and its animation frames running, even when it is not
the foreground window (many board pages in one browser: each must behave like the screen it stands for)."""


class PageError(RuntimeError):
    """A script evaluated in a page threw (``exceptionDetails``), or a command returned a protocol error."""


def chromium_binary() -> str | None:
    """The Chromium executable on PATH (``/usr/bin/chromium`` on Debian), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevTools:
    """Commands and events over one browser-level DevTools WebSocket (flattened sessions).

    Args:
        ws: an open ``websockets`` client connection to the browser's ``webSocketDebuggerUrl``.
        keep_events: keep protocol events (messages without an ``id``) for :meth:`wait_event`; a client that
            waits on none (the benchmark with many pages) passes False so that they are dropped, not queued.

    ``proc`` is the browser process when :func:`chromium` made the client (tests may kill it).
    Errors: :class:`PageError` for a protocol error or a script exception; TimeoutError when an answer is late;
    ConnectionError when the browser went away while a command waited.
    """

    def __init__(self, ws: Any, *, keep_events: bool = True) -> None:
        self.ws = ws
        self.keep_events = keep_events
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.proc: asyncio.subprocess.Process | None = None
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(Exception):  # the socket closing (or the browser dying) ends the reader
            async for raw in self.ws:
                message = json.loads(raw)
                if "id" not in message:
                    if self.keep_events:
                        self.events.put_nowait(message)
                    continue
                future = self.pending.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message)
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("DevTools connection closed"))

    async def call(self, method: str, session: str | None = None, timeout_s: float = 15, **params: Any) -> Any:
        """Send one command (to the browser, or to ``session``) and return its ``result``."""
        call_id = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[call_id] = future
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        try:
            await self.ws.send(json.dumps(message))
            async with asyncio.timeout(timeout_s):
                reply = await future
        finally:
            self.pending.pop(call_id, None)
        if "error" in reply:
            raise PageError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def wait_event(self, method: str, timeout_s: float = 15) -> dict[str, Any]:
        """The next event named ``method`` (earlier events of other names are discarded)."""
        async with asyncio.timeout(timeout_s):
            while True:
                event = await self.events.get()
                if event.get("method") == method:
                    return event

    async def evaluate(
        self, session: str, expression: str, timeout_s: float = 15, *, await_promise: bool = True
    ) -> Any:
        """The value of ``expression`` in the page (JSON-serialisable; a promise is awaited unless told not to)."""
        result = await self.call(
            "Runtime.evaluate",
            session,
            timeout_s=timeout_s,
            expression=expression,
            awaitPromise=await_promise,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            raise PageError(f"page error: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    async def wait_in_page(self, session: str, condition_js: str, timeout_s: float = 15) -> Any:
        """Resolve with the value of ``condition_js`` once truthy, re-checked on every animation frame inside the
        page (no polling from here)."""
        expression = (
            "new Promise((resolve) => { const check = () => { let v = false; try { v = (" + condition_js + "); }"
            " catch (e) { v = false; } if (v) resolve(v); else requestAnimationFrame(check); }; check(); })"
        )
        return await self.evaluate(session, expression, timeout_s=timeout_s)

    async def poll(self, session: str, condition_js: str, timeout_s: float, every_s: float = 0.2) -> Any:
        """Like :meth:`wait_in_page` but polled from here, so it survives the page navigating (or a page too busy
        to run animation frames).  Raises TimeoutError."""
        async with asyncio.timeout(timeout_s):
            while True:
                with contextlib.suppress(PageError):
                    value = await self.evaluate(
                        session,
                        f"(() => {{ try {{ return {condition_js}; }} catch (e) {{ return null; }} }})()",
                        timeout_s=timeout_s,
                        await_promise=False,
                    )
                    if value:
                        return value
                await asyncio.sleep(every_s)

    async def new_page(
        self, width: int = 1920, height: int = 1080, *, mobile: bool = False, new_window: bool = False
    ) -> str:
        """A blank page (a tab, or a window of its own: a background tab is hidden and gets no animation frames)
        with the given viewport at device scale 1; returns its session id (Page domain enabled)."""
        extra: dict[str, Any] = {"newWindow": True, "width": width, "height": height} if new_window else {}
        target = await self.call("Target.createTarget", url="about:blank", **extra)
        session: str = (await self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True))[
            "sessionId"
        ]
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=mobile,
        )
        await self.call("Page.enable", session)
        return session

    async def navigate(self, session: str, url: str) -> None:
        """Navigate the page (subclasses may put cookies into the browser first)."""
        await self.call("Page.navigate", session, url=url)

    async def open_page(
        self, url: str, width: int = 1920, height: int = 1080, mobile: bool = False, timeout_s: float = 15
    ) -> str:
        """A new tab at ``url`` with the given viewport; returns its session id once loaded (``loadEventFired``)."""
        session = await self.new_page(width, height, mobile=mobile)
        await self.navigate(session, url)
        await self.wait_event("Page.loadEventFired", timeout_s)
        return session

    async def screenshot(self, session: str, path: Path) -> None:
        """Save a PNG of the page's viewport at ``path`` (its folder is created)."""
        shot = await self.call("Page.captureScreenshot", session, format="png")
        data = base64.b64decode(shot["data"])

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

        await asyncio.to_thread(write)

    async def click_at(self, session: str, x: float, y: float) -> None:
        """A real left mouse click (press, release) at viewport coordinates."""
        for kind in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", session, type=kind, x=x, y=y, button="left", clickCount=1)

    async def click(self, session: str, selector_js: str, *, scroll: bool = False) -> None:
        """A real click at the centre of the element ``selector_js`` evaluates to (scrolled to the middle of the
        viewport first when ``scroll``)."""
        if scroll:
            await self.evaluate(session, f"({selector_js}).scrollIntoView({{block: 'center'}})")
        box = await self.evaluate(
            session,
            "(() => { const r = (" + selector_js + ").getBoundingClientRect();"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()",
        )
        await self.click_at(session, box["x"], box["y"])

    async def insert_text(self, session: str, text: str) -> None:
        """Type ``text`` into the focused element."""
        await self.call("Input.insertText", session, text=text)

    async def close(self) -> None:
        """Stop reading and close the WebSocket (idempotent)."""
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        with contextlib.suppress(Exception):
            await self.ws.close()


@contextlib.asynccontextmanager
async def chromium(
    *extra_args: str,
    binary: str | None = None,
    window: tuple[int, int] | None = (1920, 1080),
    cpus: frozenset[int] | None = None,
    keep_events: bool = True,
    client: type[DevTools] = DevTools,
    profile_prefix: str = "gh-chromium-",
    flags: Sequence[str] = BASE_FLAGS,
) -> AsyncIterator[DevTools]:
    """A fresh headless Chromium with a throw-away profile; yields its DevTools client (``client`` class), whose
    ``proc`` is the browser process.  The browser is terminated (killed after 10 s) and the profile removed on exit.

    Args:
        extra_args: more command-line flags (e.g. :data:`KEEP_RENDERING_FLAGS`).
        binary: the executable (default: :func:`chromium_binary`).
        window: ``--window-size`` (None: Chromium's default).
        cpus: confine every process of the browser to these CPUs (Linux ``sched_setaffinity``; None: anywhere).
        keep_events: see :class:`DevTools`.

    Raises:
        FileNotFoundError: no Chromium found.
        RuntimeError: Chromium exited before opening DevTools.
        TimeoutError: DevTools did not open within 30 s.
    """
    import websockets  # the project's test extra

    exe = binary or chromium_binary()
    if exe is None:
        raise FileNotFoundError("headless Chromium is not installed (apt-get install -y chromium)")
    profile = tempfile.mkdtemp(prefix=profile_prefix)
    size = [f"--window-size={window[0]},{window[1]}"] if window else []
    proc = await asyncio.create_subprocess_exec(
        exe,
        *flags,
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        *size,
        *extra_args,
        "about:blank",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    drain: asyncio.Task[None] | None = None
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            while True:
                line = (await proc.stderr.readline()).decode(errors="replace")
                if not line:
                    raise RuntimeError("chromium exited before opening DevTools")
                if match := re.search(r"DevTools listening on (ws://\S+)", line):
                    break
        drain = asyncio.create_task(_drain(proc.stderr))  # a full stderr pipe would stall the browser
        async with websockets.connect(match.group(1), max_size=256 * 1024 * 1024) as ws:
            devtools = client(ws, keep_events=keep_events)
            devtools.proc = proc
            try:
                yield devtools
            finally:
                await devtools.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if drain is not None:
            drain.cancel()
        shutil.rmtree(profile, ignore_errors=True)


async def _drain(stream: asyncio.StreamReader) -> None:
    with contextlib.suppress(Exception):
        while await stream.readline():
            pass
