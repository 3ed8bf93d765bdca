"""The crew screen's HTTP side (in-process ASGI): state, one-tap status, pre-alert form, local-only guards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from ambulance_agent.app import Agent
from ambulance_agent.crew_screen import STATIC, TRAUMA_RED_CRITERIA, create_app
from ambulance_agent.outbox import OutboxFullError
from broker_config import BrokerSettings, CaseType, CrewStatus, PreAlert, Status, Stream, TopicSpace, decode

SPACE = TopicSpace("t-crew/")
HOST = "127.0.0.1:8181"
NOTE = "Name <unknown> & `x` <img src=x onerror=alert(1)>"


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    a = Agent("amb-7", BrokerSettings(), SPACE, outbox_path=tmp_path / "o.db", ecg=None, vitals=None, gps=None)
    yield a
    a.close()


@pytest.fixture
async def client(agent: Agent) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(agent, allowed_hosts={HOST, "localhost:8181"})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=f"http://{HOST}") as c:
        yield c


def stored(agent: Agent, stream: Stream) -> list[object]:
    return [decode(SPACE, m.topic, m.payload)[1] for m in agent.outbox.pending(100) if m.stream is stream]


async def test_page_and_state(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert "crew.js" in page.text
    assert "http" not in page.text.replace("http-equiv", ""), "no CDN or remote resource"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    js = await client.get("/static/crew.js")
    assert js.status_code == 200
    assert "innerHTML" not in js.text, "crew and hospital text only ever goes in with textContent"
    state = (await client.get("/api/state")).json()
    assert state["unit_id"] == "amb-7"
    assert state["buttons"] == ["en_route", "on_scene", "patient_contact", "transporting", "at_hospital", "handed_over"]
    assert state["trauma_red_criteria"] == list(TRAUMA_RED_CRITERIA)
    assert state["link"]["connected"] is False
    assert state["prealerts"] == []
    assert state["alarms_total"] is None
    assert (STATIC / "crew.css").exists()


async def test_status_tap_and_prealert_go_to_the_outbox(client: httpx.AsyncClient, agent: Agent) -> None:
    tap = await client.post("/api/status", json={"status": "patient_contact"})
    assert tap.status_code == 200
    assert tap.json()["status"] == "patient_contact"
    lkw = datetime(2025, 3, 14, 8, 50, tzinfo=UTC)
    form = {
        "case_type": "stroke",
        "age_years": 71,
        "sex": "female",
        "be_fast_positive": True,
        "lams": 4,
        "gcs_total": 13,
        "last_known_well_at": lkw.isoformat(),
        "sbp_mmhg": 182,
        "eta_min": 12,
        "note": NOTE,
    }
    reply = await client.post("/api/prealert", json=form)
    assert reply.status_code == 200
    alert_id = reply.json()["alert_id"]
    statuses = stored(agent, Stream.STATUS)
    assert [s.status for s in statuses if isinstance(s, Status)] == [CrewStatus.PATIENT_CONTACT]
    (prealert,) = stored(agent, Stream.PREALERT)
    assert isinstance(prealert, PreAlert)
    assert (prealert.alert_id, prealert.case_type, prealert.eta_s) == (alert_id, CaseType.STROKE, 720)
    f = prealert.findings
    assert (f.age_years, f.sex, f.be_fast_positive, f.lams, f.gcs_total, f.sbp_mmhg) == (71, "female", True, 4, 13, 182)
    assert f.last_known_well_at == lkw
    assert f.note == NOTE, "the crew's text travels exactly as typed"
    assert f.fmc_at is not None, "first medical contact is the patient-contact tap"
    state = (await client.get("/api/state")).json()
    assert [(p["alert_id"], p["stage"], p["case_type"]) for p in state["prealerts"]] == [(alert_id, "queued", "stroke")]


async def test_bad_input_is_refused(client: httpx.AsyncClient) -> None:
    assert (await client.post("/api/status", json={"status": "flying"})).status_code == 422
    assert (await client.post("/api/prealert", json={"case_type": "stroke", "lams": 9})).status_code == 422
    assert (await client.post("/api/prealert", json={"case_type": "stroke", "extra": 1})).status_code == 422
    naive = {"case_type": "stroke", "last_known_well_at": "2025-03-14T08:50:00"}
    assert (await client.post("/api/prealert", json=naive)).status_code == 422


async def test_local_only_guards(client: httpx.AsyncClient) -> None:
    rebinding = await client.get("/api/state", headers={"host": "evil.example:8181"})
    assert rebinding.status_code == 421
    cross = await client.post("/api/status", json={"status": "en_route"}, headers={"origin": "http://evil.example"})
    assert cross.status_code == 403
    form_post = await client.post("/api/status", content=b"status=en_route", headers={"content-type": "text/plain"})
    assert form_post.status_code == 415
    same = await client.post("/api/status", json={"status": "en_route"}, headers={"origin": f"http://{HOST}"})
    assert same.status_code == 200


async def test_a_full_storage_tells_the_crew_the_prealert_was_not_sent(
    client: httpx.AsyncClient, agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox could not keep it (disk full, nothing left to shed): the crew reads NOT SENT and what to do."""

    def full(*_: object, **__: object) -> int:
        raise OutboxFullError("disk full")

    monkeypatch.setattr(agent.outbox, "put", full)
    r = await client.post("/api/prealert", json={"case_type": "stemi"})
    assert r.status_code == 507
    assert "NOT SENT" in r.json()["detail"]
    assert "hospital" in r.json()["detail"]
    r = await client.post("/api/status", json={"status": "en_route"})
    assert r.status_code == 507
