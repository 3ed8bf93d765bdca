"""The board pages in a real headless Chromium (DevTools protocol): escalation and tones with silence, per-department
acknowledgement, a killed browser dropped and a reconnecting one resynced, a skewed page clock, the patient detail
(leads, trends, map, gaps, no position) and the phone view.  Screenshots at 1920x1080 (and 4K, phone) go to
``artifacts/``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import numpy as np
import pytest
from test_board_browser import ARTIFACTS, board_server, chromium, chromium_binary, ecg_chunks

from broker_config import (
    STREAMS,
    Activation,
    ActivationState,
    AlertAck,
    AlertState,
    Availability,
    BrokerSettings,
    CaseType,
    Department,
    EcgChunk,
    Findings,
    GpsFix,
    HospitalAlert,
    Priority,
    Stream,
    TopicSpace,
    Vitals,
    decode_as,
    encode,
)

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

AUTOPLAY = "--autoplay-policy=no-user-gesture-required"
Pub = Callable[[Stream, str, Any], Awaitable[None]]


@asynccontextmanager
async def bus(broker: BrokerSettings, space: TopicSpace) -> AsyncIterator[tuple[Pub, asyncio.Queue[AlertAck]]]:
    acks: asyncio.Queue[AlertAck] = asyncio.Queue()
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"t-{uuid.uuid4().hex[:8]}") as mqtt:
        await mqtt.subscribe(space.topic(Stream.ACK, "HA"), qos=1)

        async def pub(stream: Stream, owner: str, message: Any) -> None:
            await mqtt.publish(space.topic(stream, owner), encode(stream, message), qos=STREAMS[stream].qos)

        async def collect() -> None:
            async for message in mqtt.messages:
                assert isinstance(message.payload, bytes)
                await acks.put(decode_as(AlertAck, space, message.topic.value, message.payload))

        task = asyncio.create_task(collect())
        try:
            yield pub, acks
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task


async def next_ack(acks: asyncio.Queue[AlertAck], predicate: Callable[[AlertAck], bool]) -> AlertAck:
    async with asyncio.timeout(10):
        while True:
            ack = await acks.get()
            if predicate(ack):
                return ack


def stemi(now: datetime, seq: int, activations: tuple[Activation, ...], **extra: Any) -> HospitalAlert:
    return HospitalAlert(
        unit_id="U1",
        seq=seq,
        sent_at=now,
        alert_id="a1",
        hospital_id="HA",
        case_type=CaseType.STEMI,
        priority=Priority.HIGH,
        eta_at=now + timedelta(minutes=7),
        departments=(Department.CATH_LAB, Department.ED),
        findings=Findings(age_years=64, sex="male", ecg_st_elevation=True, note="Chest pain 40 min", fmc_at=now),
        reasons=("24/7 PCI centre",),
        activations=activations,
        **extra,
    )


async def unit_streams(pub: Pub, now: datetime, unit_id: str = "U1", *, position: bool = True) -> None:
    await pub(Stream.AVAILABILITY, unit_id, Availability(unit_id=unit_id, seq=1, sent_at=now, state="online"))
    for i in range(5):
        at = now - timedelta(seconds=8 - 2 * i)
        vitals = Vitals(
            unit_id=unit_id,
            seq=i,
            sent_at=at,
            measured_at=at,
            heart_rate_bpm=88 + i,
            heart_rate_source="monitor",
            spo2_pct=95,
            sbp_mmhg=128,
            dbp_mmhg=80,
            resp_rate_per_min=18,
        )
        await pub(Stream.VITALS, unit_id, vitals)
    for chunk in ecg_chunks(10, now):
        await pub(Stream.ECG, unit_id, chunk.model_copy(update={"unit_id": unit_id}))
    if position:
        fix = GpsFix(unit_id=unit_id, seq=0, sent_at=now, fix=True, lat_deg=43.7402, lon_deg=7.4263)
        await pub(Stream.GPS, unit_id, fix)


async def test_escalation_tone_silence_and_department_acknowledgement(
    embedded_broker: BrokerSettings, topic_space: TopicSpace
) -> None:
    chromium_binary()
    async with (
        board_server(embedded_broker, topic_space) as (url, _runtime),
        bus(embedded_broker, topic_space) as (pub, acks),
        chromium(AUTOPLAY) as cdp,
    ):
        now = datetime.now(UTC)
        cath = Activation(
            department=Department.CATH_LAB,
            state=ActivationState.ESCALATED,
            level="backup",
            paged_at=now - timedelta(minutes=2),
            escalate_at=now + timedelta(seconds=90),
        )
        ed = Activation(department=Department.ED, paged_at=now, escalate_at=now + timedelta(seconds=100))
        await pub(Stream.ALERT, "HA", stemi(now, 1, (cath, ed), state=AlertState.ESCALATED))
        await unit_streams(pub, now)
        session = await cdp.open_page(f"{url}/?hospital=HA")
        await cdp.wait_in_page(
            session,
            "document.querySelector('.card .act-escalated') && document.querySelector('#link').textContent === 'LIVE'",
        )
        shown = await cdp.wait_in_page(
            session,
            "(() => { const c = document.querySelector('.card'); const rows = [...c.querySelectorAll('.act')];"
            " const r = rows.map((li) => ({d: li.dataset.department, s: li.querySelector('.act-state').textContent,"
            " clock: li.querySelector('.act-clock').textContent}));"
            " return r.every((x) => x.clock) ? {rows: r, flashing: c.classList.contains('flash-high'),"
            " state: c.querySelector('.ack-state').textContent} : null; })()",
        )
        cath_row, ed_row = shown["rows"]
        assert cath_row["d"] == "cath_lab"
        assert cath_row["s"] == "ESCALATED to backup"
        assert cath_row["clock"].startswith("next escalation in 1:")
        assert ed_row["s"] == "PAGED primary"
        assert ed_row["clock"].startswith("escalates in 1:")
        assert shown["flashing"]
        assert shown["state"] == "ESCALATED - not yet acknowledged"
        tones = await cdp.wait_in_page(session, "window.__ghTones.length && window.__ghTones")
        assert tones[0]["priority"] == "high"
        assert tones[0]["pulses"] == 10
        assert tones[0]["state"] == "running"
        await cdp.screenshot(session, ARTIFACTS / "board-1920x1080-escalation.png")

        # Silence: no acknowledgement, visible countdown, visual alarm continues.
        await cdp.click(session, "document.querySelector('#silence')")
        silenced = await cdp.wait_in_page(
            session,
            "(() => { const b = document.querySelector('.card .silenced');"
            " const s = document.querySelector('#silence');"
            " return !b.classList.contains('hidden') && s.textContent.startsWith('AUDIO PAUSED') ?"
            " {badge: b.textContent, button: s.textContent, n: window.__ghTones.length,"
            " flashing: document.querySelector('.card').classList.contains('flash-high')} : null; })()",
        )
        assert silenced["badge"].startswith("SILENCED 1:5") or silenced["badge"].startswith("SILENCED 2:00")
        assert silenced["flashing"], "silence is not acknowledgement: the card keeps flashing"
        assert acks.empty() or all(a.state is AlertState.ON_BOARD for a in list(acks._queue))  # type: ignore[attr-defined]

        # A new escalation step sounds again even while silenced.
        ed_escalated = ed.model_copy(update={"state": ActivationState.ESCALATED, "level": "backup"})
        await pub(Stream.ALERT, "HA", stemi(now, 2, (cath, ed_escalated), state=AlertState.ESCALATED))
        await cdp.wait_in_page(session, f"window.__ghTones.length > {silenced['n']}")

        # Acknowledge one department: AlertAck(department=cath_lab) on the bus; the row shows it at once.
        await cdp.click(session, "document.querySelector('.card .act[data-department=cath_lab] button')")
        ack = await next_ack(acks, lambda a: a.state is AlertState.ACKNOWLEDGED)
        assert (ack.alert_id, ack.department) == ("a1", Department.CATH_LAB)
        row = await cdp.wait_in_page(
            session,
            "(() => { const li = document.querySelector('.card .act[data-department=cath_lab]');"
            " return li.dataset.state === 'acknowledged' ? li.querySelector('.act-state').textContent : ''; })()",
        )
        assert row.startswith("ACK ")
        # ...then all at once.
        await cdp.click(session, "document.querySelector('.card .foot button.ack')")
        ack = await next_ack(acks, lambda a: a.state is AlertState.ACKNOWLEDGED)
        assert ack.department is None
        await cdp.wait_in_page(
            session, "document.querySelector('.card .ack-state').textContent.startsWith('ACKNOWLEDGED')"
        )
        assert not await cdp.evaluate(session, "document.querySelector('.card').classList.contains('flash-high')")


async def test_killed_browser_is_dropped_and_a_reconnecting_one_resyncs(
    embedded_broker: BrokerSettings, topic_space: TopicSpace
) -> None:
    chromium_binary()
    async with (
        board_server(embedded_broker, topic_space, heartbeat_s=0.5) as (url, runtime),
        bus(embedded_broker, topic_space) as (pub, _acks),
    ):
        hub = runtime.hub
        now = datetime.now(UTC)
        await pub(Stream.ALERT, "HA", stemi(now, 1, ()))
        async with chromium() as victim:
            session = await victim.open_page(f"{url}/?hospital=HA")
            await victim.wait_in_page(session, "document.querySelector('.card') !== null")
            await hub.wait_until(lambda h: h.count("HA") == 1, timeout_s=10)
            assert victim.proc is not None
            victim.proc.kill()  # no goodbye: the socket just dies
            await hub.wait_until(lambda h: h.count("HA") == 0, timeout_s=3 * 0.5 + 2)
        assert hub.disconnects["client gone"] + hub.disconnects["send timeout"] >= 1

        # An alert arrives while no board is connected; a new browser gets it in its snapshot.
        second = HospitalAlert(
            unit_id="U2",
            seq=2,
            sent_at=now,
            alert_id="a2",
            hospital_id="HA",
            case_type=CaseType.TRAUMA,
            priority=Priority.MEDIUM,
        )
        await pub(Stream.ALERT, "HA", second)
        async with chromium() as fresh:
            session = await fresh.open_page(f"{url}/?hospital=HA")
            await fresh.wait_in_page(session, "document.querySelectorAll('.card').length === 2")
            # The server drops this board (e.g. it fell behind); while it is away a third alert comes; the page
            # reconnects by itself and its new snapshot brings the missed alert.
            hub.close_all()
            third = second.model_copy(update={"alert_id": "a3", "unit_id": "U3", "priority": Priority.LOW, "seq": 3})
            await pub(Stream.ALERT, "HA", third)
            await fresh.wait_in_page(session, "document.querySelectorAll('.card').length === 3", timeout_s=15)
            await hub.wait_until(lambda h: h.count("HA") == 1, timeout_s=10)


async def test_page_clock_off_by_minutes_changes_no_age(
    embedded_broker: BrokerSettings, topic_space: TopicSpace
) -> None:
    chromium_binary()
    async with (
        board_server(embedded_broker, topic_space) as (url, _runtime),
        bus(embedded_broker, topic_space) as (pub, _acks),
        chromium() as cdp,
    ):
        now = datetime.now(UTC)
        await pub(Stream.ALERT, "HA", stemi(now, 1, ()))
        await unit_streams(pub, now)
        results = {}
        for skew_min in (-20, 20):
            target = await cdp.call("Target.createTarget", url="about:blank")
            session = (await cdp.call("Target.attachToTarget", targetId=target["targetId"], flatten=True))["sessionId"]
            await cdp.call("Page.enable", session)
            skew = (
                "(() => { const off = " + str(skew_min * 60_000) + "; const RealDate = Date;"
                " const realNow = RealDate.now.bind(RealDate);"
                " class Skewed extends RealDate { constructor(...a) { super(...(a.length ? a : [realNow() + off])); }"
                " static now() { return realNow() + off; } } window.Date = Skewed; })();"
            )
            await cdp.call("Page.addScriptToEvaluateOnNewDocument", session, source=skew)
            await cdp.call("Page.navigate", session, url=f"{url}/?hospital=HA")
            results[skew_min] = await cdp.wait_in_page(
                session,
                "(() => { const c = document.querySelector('.card'); if (!c) return null;"
                " const hr = c.querySelector('[data-vital=hr]'); const age = hr.querySelector('.v-age').textContent;"
                " if (!age.endsWith('ago')) return null;"
                " return {age: age, stale: hr.classList.contains('stale'),"
                " eta: c.querySelector('.eta-value').textContent, link: document.querySelector('#link').textContent,"
                " avail: c.querySelector('.availability').textContent,"
                " skewed: Math.round((Date.now() - performance.timeOrigin - performance.now()) / 60000)}; })()",
            )
        for skew_min, shown in results.items():
            assert shown["skewed"] == skew_min, "the page's clock really is off"
            assert not shown["stale"], shown
            assert not shown["age"].startswith("STALE"), shown
            assert shown["link"] == "LIVE"
            assert shown["avail"] == "online"
            minutes = int(shown["eta"].split(":")[0])
            assert 5 <= minutes <= 7, f"ETA from the server clock, not the page's: {shown}"


async def test_patient_detail_and_phone_views(embedded_broker: BrokerSettings, topic_space: TopicSpace) -> None:
    chromium_binary()
    async with (
        board_server(embedded_broker, topic_space) as (url, _runtime),
        bus(embedded_broker, topic_space) as (pub, acks),
        chromium() as cdp,
    ):
        now = datetime.now(UTC)
        ed = Activation(department=Department.ED, paged_at=now, escalate_at=now + timedelta(seconds=120))
        await pub(Stream.ALERT, "HA", stemi(now, 1, (ed,)))
        await unit_streams(pub, now)
        # a chunk after a jump of two sequence numbers: a gap on the strip
        last = ecg_chunks(10, now)[-1]
        gap_chunk = EcgChunk(
            unit_id="U1",
            seq=12,
            sent_at=now + timedelta(seconds=3),
            start_at=now + timedelta(seconds=2),
            fs_hz=last.fs_hz,
            leads=last.leads,
            gain_adc_per_mv=last.gain_adc_per_mv,
            baseline_adc=last.baseline_adc,
            samples=np.array(last.samples),
        )
        await pub(Stream.ECG, "U1", gap_chunk)
        no_fix = stemi(now, 2, ()).model_copy(update={"alert_id": "a2", "unit_id": "U2"})
        await pub(Stream.ALERT, "HA", no_fix)
        await unit_streams(pub, now, "U2", position=False)
        await pub(Stream.GPS, "U2", GpsFix(unit_id="U2", seq=0, sent_at=now, fix=False))

        session = await cdp.open_page(f"{url}/unit/U1?hospital=HA")
        shown = await cdp.wait_in_page(
            session,
            "(() => { const leads = [...document.querySelectorAll('#leads button')].map((b) => b.textContent);"
            " const tl = document.querySelectorAll('#timeline li').length;"
            " const gaps = document.querySelector('#gaps').textContent;"
            " const hr = document.querySelector('[data-vital=hr] .v-value').textContent;"
            " return leads.length >= 3 && tl && gaps && hr !== '--' ? {leads, tl, gaps, hr,"
            " map: document.querySelector('#map-state').textContent} : null; })()",
        )
        assert shown["leads"] == ["MLII", "V5", "All"], "every lead of the chunk, not only the first"
        assert shown["gaps"].startswith("Data gaps: 1 in ECG")
        assert shown["map"] == "", "U1 has a fix: it is drawn"
        assert shown["hr"] == "92"
        await cdp.click(session, "[...document.querySelectorAll('#leads button')].find((b) => b.textContent === 'V5')")
        await cdp.wait_in_page(session, "document.querySelector('#ecg-strips .ecg-label').textContent === 'Lead V5'")
        trend_px = await cdp.wait_in_page(
            session,
            "(() => { const cv = document.querySelector('#trend-hr'); const d = cv.getContext('2d')"
            ".getImageData(0, 0, cv.width, cv.height).data; let n = 0; for (let i = 0; i < d.length; i += 4)"
            " { if (d[i + 1] > 200 && d[i] < 120) n++; } return n > 20 ? n : 0; })()",
        )
        assert trend_px > 20
        await cdp.wait_in_page(session, "document.querySelector('#route-info').textContent !== ''")
        await cdp.screenshot(session, ARTIFACTS / "detail-1920x1080.png")
        await cdp.click(session, "document.querySelector('#acts .act[data-department=ed] button')")
        ack = await next_ack(acks, lambda a: a.state is AlertState.ACKNOWLEDGED)
        assert ack.department is Department.ED

        other = await cdp.open_page(f"{url}/unit/U2?hospital=HA")
        state = await cdp.wait_in_page(
            other,
            "document.querySelector('#link').textContent === 'LIVE'"
            " && document.querySelector('#map-state').textContent",
        )
        assert state == "NO POSITION", "a unit without a fix is listed, never drawn at 0,0 (FF-15)"
        # another hospital's patient view is refused to this hospital's staff (DOMAIN.md section 11)
        not_ours = await cdp.evaluate(other, "fetch('/unit/U1?hospital=HB').then((r) => r.status)")
        assert not_ours == 403

        phone = await cdp.open_page(f"{url}/phone?hospital=HA&unit=U2", width=390, height=844, mobile=True)
        await cdp.wait_in_page(
            phone,
            "document.querySelector('#link').textContent === 'LIVE' && document.querySelector('#leads button')",
        )
        await cdp.screenshot(phone, ARTIFACTS / "phone-390x844.png")
        await cdp.click(phone, "document.querySelector('#ack-all')")
        ack = await next_ack(acks, lambda a: a.state is AlertState.ACKNOWLEDGED)
        assert (ack.alert_id, ack.by_role) == ("a2", "ed_staff")  # the token's role, whatever the page sends

        board4k = await cdp.open_page(f"{url}/?hospital=HA", width=3840, height=2160)
        size = await cdp.wait_in_page(
            board4k,
            "document.querySelectorAll('.card').length === 2 &&"
            " getComputedStyle(document.querySelector('.card .v-value')).fontSize",
        )
        assert size == "144px", "4K: the 1080p sizes doubled (4.5rem at 32 px)"
        await cdp.screenshot(board4k, ARTIFACTS / "board-3840x2160.png")
