"""Dispatch state survives a restart: the SQL repository on a fresh PostgreSQL database (and on SQLite)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from broker_config import (
    ActivationState,
    AlertAck,
    AlertState,
    BrokerSettings,
    CaseType,
    CrewStatus,
    Department,
    Findings,
    GpsFix,
    PreAlert,
    Status,
    Stream,
    TopicSpace,
    encode,
)
from broker_config.connection import NotConnectedError
from dispatch.errors import StoreError
from dispatch.hospitals import HospitalRegistry
from dispatch.repository import EventKind
from dispatch.service import DispatchService
from dispatch.sql_repository import SqlRepository, load_migrations

T0 = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)
SPACE = TopicSpace("persist-test/")


class Link:
    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.sessions = 0
        self.published = 0

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False, timeout_s: float) -> None:
        self.published += 1

    async def wait_connected(self, timeout_s: float) -> None:
        raise NotConnectedError("unused")


def make_service(url: str) -> DispatchService:
    svc = DispatchService(
        BrokerSettings(), SPACE, HospitalRegistry.load(), None, repository=SqlRepository.from_url(url), clock=lambda: T0
    )
    svc.link = Link()  # type: ignore[assignment]
    return svc


async def feed(svc: DispatchService, stream: Stream, owner: str, model: object) -> None:
    await svc.handle(SPACE.topic(stream, owner), encode(stream, model))  # type: ignore[arg-type]


async def scenario_survives_restart(url: str) -> None:
    first = make_service(url)
    await first.open()
    fix = GpsFix(unit_id="AMB12", seq=1, sent_at=T0, fix=True, lat_deg=43.7304054, lon_deg=7.4114082)
    await feed(first, Stream.GPS, "AMB12", fix)
    status = Status(unit_id="AMB12", seq=2, sent_at=T0, status=CrewStatus.TRANSPORTING, at=T0)
    await feed(first, Stream.STATUS, "AMB12", status)
    findings = Findings(fmc_at=T0 - timedelta(minutes=5), age_years=61, note="free text stays in the store")
    alert = PreAlert(unit_id="AMB12", seq=3, sent_at=T0, alert_id="P-1", case_type=CaseType.STEMI, findings=findings)
    await feed(first, Stream.PREALERT, "AMB12", alert)
    ack = AlertAck(
        unit_id="AMB12",
        seq=0,
        sent_at=T0,
        alert_id="P-1",
        hospital_id="MC-CCM",
        state=AlertState.ACKNOWLEDGED,
        department=Department.ED,
        by_role="ed_nurse",
        at=T0 + timedelta(seconds=20),
    )
    await feed(first, Stream.ACK, "MC-CCM", ack)
    until = T0 + timedelta(days=3650)
    await first.set_hospital_status("MC-CHPG", by="ED charge nurse", at=T0, diversion=True, until=until)
    await first.set_hospital_status("MC-CHPG", by="ED charge nurse", at=T0, ed_beds_free=2, until=until)
    assert first.rejected == {}
    before = first.repo.alert("P-1")
    assert before is not None
    await first.close()

    second = make_service(url)
    await second.open()
    try:
        after = second.repo.alert("P-1")
        assert after is not None
        assert after.findings == before.findings
        assert after.activations == before.activations
        assert after.recommendations == before.recommendations
        assert [(e.at, e.source, e.kind, e.detail) for e in after.timeline] == [
            (e.at, e.source, e.kind, e.detail) for e in before.timeline
        ]
        assert after.acks == before.acks
        assert after.state is before.state
        unit = second.repo.find_unit("AMB12")
        assert unit is not None
        assert unit.position_deg == (43.7304054, 7.4114082)
        assert unit.status is CrewStatus.TRANSPORTING
        assert unit.current_alert_id == "P-1"
        st = second.registry.status("MC-CHPG", T0)
        assert (st.diversion, st.ed_beds_free, st.set_by, st.until) == (True, 2, "ED charge nurse", until)
        # the cath lab page is still open: its escalation timer is restored and fires after the restart
        cath = next(a for a in after.activations if a.department is Department.CATH_LAB)
        assert cath.state is ActivationState.PAGED
        assert second.next_escalation_at() == cath.escalate_at
        assert await second.tick(T0 + timedelta(seconds=120)) == 1
        assert after.timeline[-3].kind is EventKind.ACTIVATION_ESCALATED
    finally:
        await second.close()

    third = make_service(url)
    await third.open()  # migrations are not applied twice; the escalation written by the second run is there
    try:
        again = third.repo.alert("P-1")
        assert again is not None
        assert again.state is AlertState.ESCALATED
        assert EventKind.ACTIVATION_ESCALATED in [e.kind for e in again.timeline]
    finally:
        await third.close()


@pytest.mark.integration
async def test_state_survives_restart_on_postgresql(pg_url: str) -> None:
    await scenario_survives_restart(pg_url)
    with psycopg.connect(pg_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM dispatch_schema_migrations")]
        changes = conn.execute("SELECT count(*) FROM dispatch_hospital_status").fetchone()
    assert versions == [m.version for m in load_migrations("postgres")]
    assert changes == (2,)  # every change is kept, with who and when


async def test_state_survives_restart_on_sqlite(tmp_path: Path) -> None:
    await scenario_survives_restart(f"sqlite:///{tmp_path}/dispatch.sqlite3")


async def test_unreachable_database_is_a_store_error() -> None:
    repo = SqlRepository.from_url("postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=1")
    with pytest.raises(StoreError) as info:
        await repo.open()
    assert info.value.cause == "psycopg.OperationalError"
    await repo.close()


def test_bad_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="sqlite"):
        SqlRepository.from_url("mysql://x")
    with pytest.raises(ValueError, match="file path"):
        SqlRepository.from_url("sqlite:///")
    assert load_migrations("sqlite")[0].version == 1
