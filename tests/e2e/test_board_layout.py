"""The board's layouts in a real headless Chromium: nothing overflows its box at 1920x1080 and 3840x2160 with the
demo's three inbound patients (default layout), nor with twelve patients on the wall layout (``?layout=wall``),
where the wall rules must win over the dense rules, and ten whole ECG strips are on screen.  Also the page's live
ECG order (sample time, not seq), and that a wall's feed carries the ECG of the strips on screen only, a strip
scrolled into view getting its last window whole.  Screenshots go to ``artifacts/``."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from test_board_alarms import Pub, bus, unit_streams
from test_board_browser import ARTIFACTS, board_server, chromium, chromium_binary

from broker_config import (
    Activation,
    BrokerSettings,
    CaseType,
    Department,
    Findings,
    HospitalAlert,
    Priority,
    Stream,
    TopicSpace,
)

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

LONG_NAME = "Centre Cardio-Thoracique de Monaco"
"""The demo hospital's name (dispatch's directory is not part of this test, so the page is given it)."""

OVERFLOW_JS = r"""
(() => {
  const out = [];
  const vw = document.documentElement.clientWidth;
  const sw = document.documentElement.scrollWidth;
  if (sw > vw + 1) out.push("page scrolls sideways: " + sw);
  const top = document.querySelector(".top").getBoundingClientRect();
  for (const e of document.querySelectorAll(".top h1, .top-right")) {
    const r = e.getBoundingClientRect();
    if (r.right > top.right + 1 || r.left < top.left - 1) out.push("header item outside the header: " + e.className);
  }
  const h1 = document.querySelector(".top h1");
  const right = document.querySelector(".top-right").getBoundingClientRect();
  if (h1.getBoundingClientRect().right > right.left + 1) out.push("title runs under the header's right side");
  for (const card of document.querySelectorAll("#cards .card")) {
    const c = card.getBoundingClientRect();
    const id = card.dataset.unit;
    if (card.scrollWidth > card.clientWidth + 1) out.push(id + ": card content wider than the card");
    if (c.right > vw + 1) out.push(id + ": card beyond the screen");
    const boxes = card.querySelectorAll(".banner > *, .banner .eta > *, .who > *, .foot > *, .vital, .act, canvas.ecg");
    for (const e of boxes) {
      if (!e.getClientRects().length) continue;  // not displayed in this layout
      const r = e.getBoundingClientRect();
      if (r.right > c.right - 3 || r.left < c.left + 3) {
        out.push(id + ": ." + e.className.split(" ")[0] + " outside its card (" + Math.round(r.left) + "-"
          + Math.round(r.right) + " vs " + Math.round(c.left) + "-" + Math.round(c.right) + ")");
      }
    }
    for (const e of card.querySelectorAll(".vital, .v-value, .case-type, .eta-value, .unit-id, .banner, .who, .foot")) {
      if (e.getClientRects().length && e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).display !== "inline") {
        out.push(id + ": ." + e.className + " text cut");
      }
    }
  }
  return out;
})()
"""


WHOLE_STRIPS_JS = r"""
(() => {
  const more = document.getElementById("more");
  const bottom = more.classList.contains("hidden") ? window.innerHeight : more.getBoundingClientRect().top;
  return [...document.querySelectorAll("#cards canvas.ecg")].filter((c) => {
    const r = c.getBoundingClientRect();
    return r.height > 0 && r.top >= 0 && r.bottom <= bottom && r.left >= 0 && r.right <= window.innerWidth;
  }).length;
})()
"""
"""ECG strips wholly on screen (not under the "more inbound below" bar)."""


def demo_alert(now: datetime, i: int, unit: str, case: CaseType, priority: Priority, **findings: Any) -> HospitalAlert:
    acts = (
        Activation(department=Department.CATH_LAB, paged_at=now, escalate_at=now + timedelta(seconds=150)),
        Activation(department=Department.ED, paged_at=now, escalate_at=now + timedelta(seconds=240)),
    )
    return HospitalAlert(
        unit_id=unit,
        seq=1,
        sent_at=now,
        alert_id=f"L{i}",
        hospital_id="HA",
        case_type=case,
        priority=priority,
        eta_at=now + timedelta(minutes=9 + 3 * i, seconds=41),
        departments=(Department.CATH_LAB, Department.ED) if case is CaseType.STEMI else (Department.ED,),
        findings=Findings(fmc_at=now, **findings),
        reasons=("24/7 PCI centre",) if case is CaseType.STEMI else ("requested by the crew",),
        activations=acts if case is CaseType.STEMI else (),
    )


async def publish_patients(pub: Pub, now: datetime, n: int) -> None:
    """The demo's three patients (a STEMI and two medical), then more of the same to fill a wall."""
    templates = (
        (
            CaseType.STEMI,
            Priority.HIGH,
            {
                "age_years": 64,
                "sex": "male",
                "ecg_st_elevation": True,
                "note": "Crushing chest pain for 40 min; ST elevation II, III, aVF",
            },
        ),
        (
            CaseType.MEDICAL,
            Priority.MEDIUM,
            {"age_years": 78, "sex": "female", "note": "Palpitations, irregular rhythm, known AF"},
        ),
        (
            CaseType.MEDICAL,
            Priority.LOW,
            {"age_years": 55, "sex": "male", "note": "Syncope at work, frequent ventricular ectopy"},
        ),
        (CaseType.TRAUMA, Priority.HIGH, {"age_years": 31, "sex": "female"}),
        (CaseType.STROKE, Priority.HIGH, {"age_years": 70, "sex": "male"}),
    )
    for i in range(n):
        case, priority, findings = templates[i % len(templates)]
        unit = f"AMB{i + 1}"
        await pub(Stream.ALERT, "HA", demo_alert(now, i, unit, case, priority, **findings))
        await unit_streams(pub, now, unit)


async def check_layout(cdp: Any, url: str, width: int, height: int, cards: int, name: str) -> str:
    session = await cdp.open_page(url, width=width, height=height)
    await cdp.wait_in_page(
        session,
        f"document.querySelectorAll('#cards .card').length === {cards}"
        " && [...document.querySelectorAll('[data-vital=hr] .v-value')].every((e) => e.textContent !== '--')",
        timeout_s=30,
    )
    await cdp.evaluate(session, f"document.getElementById('hospital-name').textContent = {LONG_NAME!r}")
    await cdp.evaluate(session, "new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => r(1))))")
    problems = await cdp.evaluate(session, OVERFLOW_JS)
    await cdp.screenshot(session, ARTIFACTS / f"{name}-{width}x{height}.png")
    assert problems == [], f"{name} at {width}x{height}: {problems}"
    return str(session)


async def test_demo_board_fits_1080p_and_4k(embedded_broker: BrokerSettings, topic_space: TopicSpace) -> None:
    chromium_binary()
    async with (
        board_server(embedded_broker, topic_space) as (url, _runtime),
        bus(embedded_broker, topic_space) as (pub, _acks),
        chromium() as cdp,
    ):
        await publish_patients(pub, datetime.now(UTC), 3)
        for width, height in ((1920, 1080), (3840, 2160)):
            await check_layout(cdp, f"{url}/?hospital=HA", width, height, 3, "board-demo")


async def test_wall_layout_fits_1080p_and_4k(embedded_broker: BrokerSettings, topic_space: TopicSpace) -> None:
    chromium_binary()
    async with (
        board_server(embedded_broker, topic_space) as (url, _runtime),
        bus(embedded_broker, topic_space) as (pub, _acks),
        chromium() as cdp,
    ):
        await publish_patients(pub, datetime.now(UTC), 12)
        for width, height in ((1920, 1080), (3840, 2160)):
            session = await check_layout(cdp, f"{url}/?hospital=HA&layout=wall", width, height, 12, "board-wall")
            whole = await cdp.evaluate(session, WHOLE_STRIPS_JS)
            assert whole >= 10, f"the wall shows ten whole ECG strips at {width}x{height} (got {whole})"


async def test_wall_feed_carries_the_ecg_of_strips_on_screen_only(
    embedded_broker: BrokerSettings, topic_space: TopicSpace
) -> None:
    """Twelve patients on a 1080p wall: the page tells the board which strips it shows, and its feed then carries
    their ECG only; the last card scrolled into view gets its last ECG window (ten 1-s chunks), drawn without a
    gap, and the strips that left the screen stop coming."""
    chromium_binary()
    async with (
        board_server(embedded_broker, topic_space) as (url, runtime),
        bus(embedded_broker, topic_space) as (pub, _acks),
        chromium() as cdp,
    ):
        await publish_patients(pub, datetime.now(UTC), 12)
        session = await cdp.open_page(f"{url}/?hospital=HA&layout=wall", width=1920, height=1080)
        await cdp.wait_in_page(session, "window.__ghBoard && window.__ghBoard.units.size === 12", timeout_s=30)
        key = await cdp.evaluate(session, "window.__ghBoard.feedKey")
        shown_js = "[...window.__ghBoard.units.values()].filter((u) => u.visible).map((u) => u.data.unit_id).sort()"

        async def told() -> tuple[list[str], list[str]]:
            for _ in range(100):
                shown = await cdp.evaluate(session, shown_js)
                feed = runtime.hub.feed(key)
                if feed is not None and feed.ecg_units is not None and sorted(feed.ecg_units) == shown:
                    return shown, sorted(feed.ecg_units)
                await asyncio.sleep(0.1)
            raise AssertionError(f"the feed was not told the strips on screen: {shown} vs {feed and feed.ecg_units}")

        shown, _ = await told()
        assert 10 <= len(shown) < 12, f"ten or eleven strips on screen, not all twelve: {shown}"
        last = await cdp.evaluate(
            session,
            "(() => { const c = [...document.querySelectorAll('#cards .card')].pop(); return c.dataset.unit; })()",
        )
        assert last not in shown
        await cdp.evaluate(
            session, "document.querySelector('#cards .card:last-child').scrollIntoView({block: 'end'}); 1"
        )
        await cdp.wait_in_page(session, f"window.__ghBoard.units.get({last!r}).visible", timeout_s=15)
        shown_after, _ = await told()
        assert last in shown_after
        assert shown_after != shown
        strip = await cdp.wait_in_page(
            session,
            f"(() => {{ const u = window.__ghBoard.units.get({last!r}); const s = u.strip.segs;"
            " return s.length >= 10 ? s.map((x) => [x.t0, x.t1, x.gapBefore]) : null; })()",
            timeout_s=15,
        )
        assert len(strip) == 10, "the unit's last ECG window, whole"
        for (_, prev_end, _), (start, _, gap) in itertools.pairwise(strip):
            assert not gap, "one window, no gap between its chunks"
            assert abs(start - prev_end) < 10, "one window, no hole between its chunks"


async def test_page_keeps_live_ecg_in_sample_time_order(
    embedded_broker: BrokerSettings, topic_space: TopicSpace
) -> None:
    """The page's strip (common.js) follows sample time: a late or repeated segment is not played as live."""
    chromium_binary()
    async with board_server(embedded_broker, topic_space) as (url, _runtime), chromium() as cdp:
        session = await cdp.open_page(f"{url}/?hospital=HA")
        added = await cdp.wait_in_page(
            session,
            """window.GH && (() => {
              const seg = (startMs, seq) => ({start_at: new Date(startMs).toISOString(), fs_hz: 250, lead: "II",
                lead_off: false, samples_mv: new Array(250).fill(0.1), gap_before: false, seq: seq});
              const strip = GH.newStrip();
              const t0 = Date.parse("2026-01-01T00:00:00Z");
              return [
                GH.addSegment(strip, seg(t0, 5), 10),
                GH.addSegment(strip, seg(t0 + 1000, 2 ** 53 - 1), 10),
                GH.addSegment(strip, seg(t0 + 2000, 7), 10),
                GH.addSegment(strip, seg(t0 + 1000, 8), 10),
                GH.addSegment(strip, seg(t0 + 2000, 9), 10),
                GH.addSegment(strip, seg(t0 + 3000, 0), 10),
                strip.segs.map((s) => s.t0 - t0),
              ];
            })()""",
        )
        assert added[:6] == [True, True, True, False, False, True], "older than shown and duplicates are not live"
        assert added[6] == [0, 1000, 2000, 3000], "whatever the seq (huge, restarted), the strip goes on in time"
