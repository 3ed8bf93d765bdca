"""Feed policy without sockets: coalescing, never-dropped alerts, bounded queues, lag and dead boards (FF-13/14)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest
from starlette.types import Message

from hospital_board.feed import ClientFeed, FeedHub, SseResponse, sse_frame
from hospital_board.state import BoardEvent, EventKind, RemovedEvent

NOW = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)


def event(kind: EventKind, unit_id: str = "U1", hospital_id: str = "HA", n: int = 0) -> BoardEvent:
    # RemovedEvent is the smallest payload; the kind decides the delivery policy.
    payload = RemovedEvent(server_time=NOW, unit_id=f"{unit_id}-{n}")
    return BoardEvent(kind, frozenset({hospital_id}), unit_id, payload)


def frames(data: bytes) -> list[tuple[str, dict[str, object]]]:
    out = []
    for block in data.decode().split("\n\n"):
        if not block or block.startswith(":") or block.startswith("retry:"):
            continue
        name, data_line = block.split("\n")
        out.append((name.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))))
    return out


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def test_sse_frame_is_one_event_with_one_data_line() -> None:
    frame = sse_frame(EventKind.REMOVED, RemovedEvent(server_time=NOW, unit_id="U1"))
    assert frame.endswith(b"\n\n")
    assert frame.count(b"\n") == 3
    [(name, data)] = frames(frame)
    assert name == "removed"
    assert data["unit_id"] == "U1"


def test_vitals_and_positions_coalesce_latest_wins_ecg_and_alerts_do_not() -> None:
    hub = FeedHub(max_items=1_000)
    client = hub.connect("HA")
    for n in range(50):
        hub.publish([event(EventKind.VITALS, n=n), event(EventKind.ECG, n=n), event(EventKind.POSITION, n=n)])
    hub.publish([event(EventKind.ALERT, n=0), event(EventKind.ALERT, n=1)])
    got = frames(client.take(max_bytes=10**9))
    kinds = [k for k, _ in got]
    assert kinds.count("vitals") == 1
    assert kinds.count("position") == 1
    assert kinds.count("ecg") == 50
    assert kinds.count("alert") == 2
    vitals = next(d for k, d in got if k == "vitals")
    assert vitals["unit_id"] == "U1-49", "the pending vitals event holds the newest value"
    ecg = [d["unit_id"] for k, d in got if k == "ecg"]
    assert ecg == [f"U1-{n}" for n in range(50)], "ECG segments in order, none lost"
    assert client.coalesced_events == 98


def test_events_reach_only_their_hospitals_boards() -> None:
    hub = FeedHub()
    a, b = hub.connect("HA"), hub.connect("HB")
    hub.publish([event(EventKind.ALERT, hospital_id="HA")])
    assert len(a) == 1
    assert len(b) == 0


def test_overflowing_board_is_disconnected_and_others_get_everything() -> None:
    hub = FeedHub(max_items=16)
    slow, fast = hub.connect("HA"), hub.connect("HA")
    for n in range(100):
        hub.publish([event(EventKind.ECG, n=n)])
        if n % 8 == 0:
            fast.take()
    hub.publish([event(EventKind.ALERT, n=999)])
    assert slow.closed
    assert slow.close_reason == "queue overflow"
    assert hub.count("HA") == 1
    assert hub.disconnects["queue overflow"] == 1
    assert not fast.closed
    assert frames(fast.take())[-1][0] == "alert"


def test_board_lagging_beyond_max_lag_is_disconnected() -> None:
    clock = FakeClock()
    hub = FeedHub(max_items=1_000, max_lag_s=5, clock=clock)
    client = hub.connect("HA")
    hub.publish([event(EventKind.ECG, n=0)])
    clock.now_s = 4.0
    hub.publish([event(EventKind.ECG, n=1)])
    assert not client.closed
    clock.now_s = 6.0
    hub.publish([event(EventKind.ECG, n=2)])
    assert client.close_reason == "lagging"
    assert hub.count() == 0


async def test_wait_returns_false_on_heartbeat_timeout_and_true_on_data() -> None:
    client = ClientFeed("HA", max_items=4, max_lag_s=5)
    assert await client.wait(0.01) is False
    client.offer(EventKind.ALERT, "U1", b"x", coalesce=False)
    assert await client.wait(0.01) is True


class _StuckSocket:
    """An ASGI server side whose socket writes never complete after the first ``ok_sends``."""

    def __init__(self, ok_sends: int) -> None:
        self.ok_sends = ok_sends
        self.sent: list[Message] = []
        self.never = asyncio.Event()
        self.disconnect = asyncio.Event()
        self.flowing = asyncio.Event()

    async def send(self, message: Message) -> None:
        if len(self.sent) >= self.ok_sends:
            await self.never.wait()
        self.sent.append(message)
        if len(self.sent) >= 4:  # start, snapshot and heartbeats went out
            self.flowing.set()

    async def receive(self) -> Message:
        await self.disconnect.wait()
        return {"type": "http.disconnect"}


async def test_write_that_never_completes_drops_that_board_only() -> None:
    hub = FeedHub()
    stuck_client, other = hub.connect("HA"), hub.connect("HA")
    sock = _StuckSocket(ok_sends=2)  # headers and the snapshot go out, then the peer stops reading
    response = SseResponse(hub, stuck_client, b"event: snapshot\ndata: {}\n\n", heartbeat_s=0.05, send_timeout_s=0.2)
    task = asyncio.create_task(response({"type": "http"}, sock.receive, sock.send))
    hub.publish([event(EventKind.ALERT)])
    async with asyncio.timeout(5):
        await task
    assert stuck_client.close_reason == "send timeout"
    assert hub.count("HA") == 1
    assert len(other) == 1


async def test_board_that_goes_away_leaves_the_registry_at_once() -> None:
    hub = FeedHub()
    client = hub.connect("HA")
    sock = _StuckSocket(ok_sends=10**6)
    response = SseResponse(hub, client, b"", heartbeat_s=0.05, send_timeout_s=1)
    task = asyncio.create_task(response({"type": "http"}, sock.receive, sock.send))
    async with asyncio.timeout(5):
        await sock.flowing.wait()
        sock.disconnect.set()
        await task
    assert hub.count() == 0
    assert hub.disconnects["client gone"] == 1
    assert any(b": heartbeat" in m.get("body", b"") for m in sock.sent)


def test_client_feed_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        ClientFeed("HA", max_items=0, max_lag_s=1)


def test_board_told_its_strips_gets_their_ecg_only_and_a_window_for_each_unit_coming_into_view() -> None:
    hub = FeedHub(max_items=1_000)
    client = hub.connect("HA", key="k" * 32, owner="ed-nurse")
    other = hub.connect("HA")
    assert hub.feed("k" * 32) is client
    windows = {u: [event(EventKind.ECG, unit_id=u, n=n) for n in range(3)] for u in ("U1", "U2", "U3")}
    hub.publish([event(EventKind.ECG, unit_id=u) for u in ("U1", "U2", "U3")])
    assert [d["unit_id"] for _, d in frames(client.take())] == ["U1-0", "U2-0", "U3-0"], "until told: every unit"
    # the first time: no window (the feed was receiving every unit's ECG until now)
    assert hub.set_strips(client, ["U1", "U2"], lambda u: windows[u]) == 0
    hub.publish([event(kind, unit_id=u, n=9) for u in ("U1", "U2", "U3") for kind in (EventKind.ECG, EventKind.VITALS)])
    got = [(k, d["unit_id"]) for k, d in frames(client.take())]
    assert [u for k, u in got if k == "ecg"] == ["U1-9", "U2-9"], "the strips on screen only"
    assert [u for k, u in got if k == "vitals"] == ["U1-9", "U2-9", "U3-9"], "every card's vitals still"
    assert len([k for k, _ in frames(other.take()) if k == "ecg"]) == 6, "another board is not affected"
    # U3 comes into view, U1 leaves: U3's window first, in order, then its live chunks
    assert hub.set_strips(client, ["U2", "U3"], lambda u: windows[u]) == 3
    hub.publish([event(EventKind.ECG, unit_id=u, n=10) for u in ("U1", "U2", "U3")])
    assert [d["unit_id"] for _, d in frames(client.take())] == ["U3-0", "U3-1", "U3-2", "U2-10", "U3-10"]


def test_feed_key_answers_for_the_latest_connection_only() -> None:
    hub = FeedHub(max_items=1_000)
    first = hub.connect("HA", key="k" * 32)
    second = hub.connect("HA", key="k" * 32)  # the page reconnected
    hub.disconnect(first)
    assert hub.feed("k" * 32) is second
    hub.disconnect(second)
    assert hub.feed("k" * 32) is None
    detail = hub.connect("HA", "U1", key="d" * 32)
    assert detail.key is None
    assert hub.feed("d" * 32) is None, "a patient's detail feed is not a board's"


def test_a_feed_key_held_by_another_viewer_is_not_taken_over() -> None:
    hub = FeedHub()
    owner = hub.connect("HA", key="k" * 32, owner="ed-nurse")
    other = hub.connect("HB", key="k" * 32, owner="someone-else")  # knows the key (it travels in the URL)
    assert hub.feed("k" * 32) is owner
    assert other.key is None  # it gets a feed of its own, without the key


async def test_writes_are_gathered_but_an_alert_goes_at_once() -> None:
    """With a write slot far longer than the test, vitals and ECG wait for it, and an alert takes them all at once."""
    hub = FeedHub()
    client = hub.connect("HA")
    sock = _StuckSocket(ok_sends=10**6)
    response = SseResponse(hub, client, b"", heartbeat_s=3600, send_timeout_s=1, send_every_s=3600)
    task = asyncio.create_task(response({"type": "http"}, sock.receive, sock.send))
    for _ in range(20):
        await asyncio.sleep(0)
    hub.publish([event(EventKind.VITALS, unit_id="U1"), event(EventKind.ECG, unit_id="U2")])
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(sock.sent) == 2, "headers and the (empty) resync only: vitals and ECG wait for the write slot"
    hub.publish([event(EventKind.ALERT, unit_id="U3")])
    for _ in range(50):
        await asyncio.sleep(0)
    assert len(sock.sent) == 3
    assert [k for k, _ in frames(sock.sent[2]["body"])] == ["vitals", "ecg", "alert"], "one write, in order"
    sock.disconnect.set()
    async with asyncio.timeout(5):
        await task
