"""The board page and the MQTT error boundary, without sockets (in-process ASGI, fake messages)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import httpx
import pytest

from broker_config import (
    BrokerSettings,
    CaseType,
    Findings,
    HospitalAlert,
    Priority,
    Stream,
    TopicSpace,
    encode,
)
from broker_config.identity import Role, generate_signing_key, issue_token, verify_key_text
from broker_config.paho_link import PahoLink
from broker_config.web import sign_in_script
from hospital_board.feed import FeedHub
from hospital_board.main import create_app
from hospital_board.settings import BoardSettings
from hospital_board.sources import AckSequence, BoardIngest, HospitalDirectory
from hospital_board.state import BoardState

STATIC = Path(__file__).resolve().parents[2] / "hospital_board" / "static"
NOW = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)


def test_page_never_puts_data_into_html_ff16() -> None:
    js = (STATIC / "board.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, f"board.js uses {sink}"
    assert "textContent" in js


@pytest.mark.parametrize("name", ["board.html", "board.js", "board.css"])
def test_page_loads_nothing_from_outside(name: str) -> None:
    text = (STATIC / name).read_text()
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), "no CDN, no external fonts"
    assert "@import" not in text
    assert "<script>" not in text, "no inline script (the CSP forbids it)"


def test_page_says_it_is_not_the_primary_alarm_system() -> None:
    html = " ".join((STATIC / "board.html").read_text().split())
    assert "NOT the primary patient alarm system" in html


async def test_page_chooses_hospital_and_escapes_the_dispatch_name() -> None:
    def dispatch(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/api/hospitals":  # the list dispatch serves (there is no /api/hospitals/{id})
            return httpx.Response(404)
        hospital = {"hospital_id": "HB", "name": 'St Mary\'s <b>"ED"</b> & `co`', "lat_deg": 43.7, "lon_deg": 7.4}
        return httpx.Response(200, json=[hospital, {"hospital_id": "HC", "name": "  "}, {"bad": 1}])

    key = generate_signing_key()
    settings = BoardSettings(
        broker=BrokerSettings(),
        default_hospital_id="HA",
        security_mode="development",
        verify_keys=(verify_key_text(key),),
    )
    app = create_app(settings)
    token, _ = issue_token(key, subject="disp", role=Role.DISPATCHER, ttl_s=600, now=datetime.now(UTC))
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(transport=httpx.MockTransport(dispatch)) as fake_dispatch:
        app.state.board.directory = HospitalDirectory(fake_dispatch, "http://dispatch")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://board", headers=headers) as client:
            default = await client.get("/")
            assert 'data-hospital="HA"' in default.text
            assert "script-src 'self'" in default.headers["content-security-policy"]
            page = await client.get("/", params={"hospital": "HB"})
            assert 'data-hospital="HB"' in page.text
            assert "St Mary&#x27;s &lt;b&gt;&quot;ED&quot;&lt;/b&gt; &amp; `co`" in page.text
            assert "<b>" not in page.text
            bad = await client.get("/", params={"hospital": '"><script>alert(1)</script>'})
            assert bad.status_code == 422
            css = await client.get("/static/board.css")
            assert css.status_code == 200
            script = await client.get("/login")  # the sign-in page and its script, the one dispatch serves too
            assert script.status_code == 200
            assert '<script src="/static/login.js"' in script.text
            login_js = await client.get("/static/login.js")
            assert login_js.text == sign_in_script()
            assert login_js.headers["content-type"].startswith("text/javascript")


async def test_dispatch_unreachable_falls_back_to_the_id() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as http:
        directory = HospitalDirectory(http, "http://dispatch")
        assert await directory.name("HB") == "HB"
    assert await HospitalDirectory(None, None).name("HC") == "HC"


def _ingest(space: TopicSpace) -> BoardIngest:
    link = PahoLink(BrokerSettings(), client_id="unit-test")
    return BoardIngest(BoardState(), FeedHub(), space, link, clock=lambda: NOW)


def _message(topic: str, payload: bytes) -> aiomqtt.Message:
    return aiomqtt.Message(topic, payload, qos=1, retain=False, mid=1, properties=None)


async def test_error_boundary_counts_by_reason_and_goes_on() -> None:
    space = TopicSpace("t1/")
    ingest = _ingest(space)
    bad = [
        (space.topic(Stream.VITALS, "U1"), b"{"),
        (space.topic(Stream.VITALS, "U1"), b"\xff"),
        (space.topic(Stream.ECG, "U1"), b"GHE1" + b"\x00" * 10),
        (space.topic(Stream.VITALS, "U1"), b"x" * 9_000),
        ("t1/ems/v1/unit/U1/nonsense", b"{}"),
        ("elsewhere/topic", b"{}"),
    ]
    for topic, payload in bad:
        await ingest.on_message(_message(topic, payload))
    alert = HospitalAlert(
        unit_id="U1",
        seq=1,
        sent_at=NOW,
        alert_id="a1",
        hospital_id="HA",
        case_type=CaseType.STROKE,
        priority=Priority.HIGH,
        findings=Findings(note="crew note: never logged"),
    )
    await ingest.on_message(_message(space.topic(Stream.ALERT, "HA"), encode(Stream.ALERT, alert)))
    assert ingest.backlog == 5  # off-grammar topics are refused before queueing
    while ingest.backlog:
        item = ingest._control.popleft() if ingest._control else ingest._telemetry.popleft()
        ingest.handle(item.topic, item.payload, item.parsed.owner_id)
    assert sum(ingest.rejects.values()) == 6
    assert ingest.rejects["payload # B exceeds the # B limit"] == 1
    assert ingest.accepted["alert"] == 1
    assert ingest.state.inbound_units("HA") == ["U1"]
    assert ingest._receipts.qsize() == 1, "a new alert queues its on_board receipt"


def test_log_lines_carry_ids_never_contents(caplog: pytest.LogCaptureFixture) -> None:
    space = TopicSpace("t1/")
    ingest = _ingest(space)
    secret = b'{"schema_version": 1, "unit_id": "U1", "heart_rate_bpm": 143, "note": "Jane Doe"'
    ingest.handle(space.topic(Stream.VITALS, "U1"), secret, "U1")
    text = caplog.text
    assert "U1" in text
    assert "143" not in text
    assert "Jane" not in text


def test_ack_sequence_is_strictly_increasing_across_restarts() -> None:
    clock = iter([1_000, 1_000, 999, 5_000])
    seq = AckSequence(lambda: next(clock))
    values = [seq.next() for _ in range(4)]
    assert values == [1_000, 1_001, 1_002, 5_000]


def test_bad_settings_refuse_to_start() -> None:
    with pytest.raises(ValueError):
        BoardSettings(topic_prefix="no-slash")
    with pytest.raises(ValueError):
        BoardSettings(client_queue_items=0)
    with pytest.raises(ValueError):
        BoardSettings(default_hospital_id="../etc")
