"""DispatchService handlers without a broker: the link is replaced by a recorder (unit tests may mock)."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta

import pytest

from broker_config import (
    AlertAck,
    AlertState,
    BrokerSettings,
    CaseType,
    CrewStatus,
    Findings,
    GpsFix,
    HospitalAlert,
    Notice,
    NoticeKind,
    PreAlert,
    Status,
    Stream,
    TopicSpace,
    Vitals,
    decode,
    encode,
)
from broker_config.connection import NotConnectedError
from dispatch.hospitals import DATA_DIR, HospitalRegistry
from dispatch.repository import EventKind
from dispatch.routing import RoadRouter
from dispatch.service import DispatchService

T0 = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)
AT_CHPG = (43.7304054, 7.4114082)


class RecordingLink:
    """Stands in for MqttLink: records publishes; can be told to fail."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.fail = False
        self.connected = asyncio.Event()
        self.connected.set()
        self.sessions = 1

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False, timeout_s: float) -> None:
        if self.fail:
            raise NotConnectedError("down")
        self.published.append((topic, payload, qos, retain))

    async def wait_connected(self, timeout_s: float) -> None:
        if self.fail:
            raise TimeoutError


@pytest.fixture(scope="module")
def router() -> RoadRouter:
    return RoadRouter.from_pbf(DATA_DIR / "monaco.osm.pbf")


@pytest.fixture
def space() -> TopicSpace:
    return TopicSpace("unit-test/")


@pytest.fixture
def service(router: RoadRouter, space: TopicSpace) -> tuple[DispatchService, RecordingLink]:
    svc = DispatchService(BrokerSettings(), space, HospitalRegistry.load(), router, clock=lambda: T0)
    link = RecordingLink()
    svc.link = link  # type: ignore[assignment]
    return svc, link


def gps(unit: str, seq: int, pos: tuple[float, float] | None, at: datetime = T0) -> GpsFix:
    if pos is None:
        return GpsFix(unit_id=unit, seq=seq, sent_at=at, fix=False)
    return GpsFix(unit_id=unit, seq=seq, sent_at=at, fix=True, lat_deg=pos[0], lon_deg=pos[1])


def prealert(unit: str, alert_id: str, case: CaseType = CaseType.STEMI, **kw: object) -> PreAlert:
    return PreAlert.model_validate(
        {
            "unit_id": unit,
            "seq": kw.pop("seq", 0),
            "sent_at": T0,
            "alert_id": alert_id,
            "case_type": case,
            "findings": Findings(fmc_at=T0 - timedelta(minutes=5), age_years=60, note="crew note with a name"),
            **kw,
        }
    )


async def feed(svc: DispatchService, space: TopicSpace, stream: Stream, owner: str, model: object) -> None:
    await svc.handle(space.topic(stream, owner), encode(stream, model))  # type: ignore[arg-type]


def decoded(space: TopicSpace, link: RecordingLink) -> list[object]:
    return [decode(space, topic, payload)[1] for topic, payload, _qos, _retain in link.published]


async def test_stemi_goes_to_the_pci_centre_and_the_unit_gets_its_destination(
    service: tuple[DispatchService, RecordingLink], space: TopicSpace
) -> None:
    svc, link = service
    await feed(svc, space, Stream.GPS, "AMB12", gps("AMB12", 1, AT_CHPG))
    await feed(svc, space, Stream.PREALERT, "AMB12", prealert("AMB12", "A-1"))
    alert, notice = decoded(space, link)
    assert isinstance(alert, HospitalAlert)
    assert alert.hospital_id == "MC-CCM"  # the nearest ED is CHPG, but only CCM does 24/7 PCI
    assert link.published[0][0] == space.topic(Stream.ALERT, "MC-CCM")
    assert link.published[0][2] == 1
    assert alert.eta_at is not None
    assert alert.eta_at > T0
    assert isinstance(notice, Notice)
    assert notice.kind is NoticeKind.DESTINATION
    assert notice.hospital_id == "MC-CCM"
    assert notice.alert_state is AlertState.SENT
    assert link.published[1][0] == space.topic(Stream.NOTICE, "AMB12")
    # a medical patient from the same place goes to the nearest ED instead
    await feed(svc, space, Stream.PREALERT, "AMB12", prealert("AMB12", "A-2", CaseType.MEDICAL, seq=1))
    assert decoded(space, link)[2].hospital_id == "MC-CHPG"  # type: ignore[attr-defined]


async def test_replay_is_not_a_new_alert(service: tuple[DispatchService, RecordingLink], space: TopicSpace) -> None:
    svc, link = service
    await feed(svc, space, Stream.PREALERT, "AMB12", prealert("AMB12", "A-1"))
    await feed(svc, space, Stream.PREALERT, "AMB12", prealert("AMB12", "A-1", historical=True, seq=1))
    kinds = [type(m).__name__ for m in decoded(space, link)]
    assert kinds == ["HospitalAlert", "Notice", "Notice"]  # one alert; the destination is told again
    record = svc.repo.alert("A-1")
    assert record is not None
    assert [e.kind for e in record.timeline].count(EventKind.PREALERT_REPLAYED) == 1
    assert record.timeline[-2].historical
    # another unit reusing the alert id is refused
    await feed(svc, space, Stream.PREALERT, "AMB99", prealert("AMB99", "A-1"))
    assert svc.rejected["alert_id_conflict"] == 1


async def test_historical_prealert_is_recorded_and_still_routed(
    service: tuple[DispatchService, RecordingLink], space: TopicSpace
) -> None:
    svc, link = service
    await feed(svc, space, Stream.PREALERT, "AMB12", prealert("AMB12", "H-1", historical=True))
    alert = decoded(space, link)[0]
    assert isinstance(alert, HospitalAlert)
    assert alert.historical
    assert any("store-and-forward" in r for r in alert.reasons)


async def test_without_position_the_crew_eta_is_used(
    service: tuple[DispatchService, RecordingLink], space: TopicSpace
) -> None:
    svc, link = service
    await feed(svc, space, Stream.GPS, "AMB12", gps("AMB12", 1, None))  # no fix: never (0, 0) (FF-05)
    await feed(svc, space, Stream.PREALERT, "AMB12", prealert("AMB12", "A-1", eta_s=600))
    alert = decoded(space, link)[0]
    assert isinstance(alert, HospitalAlert)
    assert alert.hospital_id == "MC-CCM"
    assert alert.eta_at == T0 + timedelta(seconds=600)
    assert "unit position unknown" in alert.reasons


@pytest.mark.parametrize(
    ("requested", "diverted", "expected", "event"),
    [
        ("MC-CHPG", False, "MC-CHPG", EventKind.CREW_REQUEST_HONOURED),
        ("MC-CHPG", True, "MC-CCM", EventKind.CREW_REQUEST_REFUSED),
        ("XX-NONE", False, "MC-CCM", EventKind.CREW_REQUEST_REFUSED),
    ],
)
async def test_crew_requested_hospital(
    service: tuple[DispatchService, RecordingLink],
    space: TopicSpace,
    requested: str,
    diverted: bool,
    expected: str,
    event: EventKind,
) -> None:
    svc, link = service
    if diverted:
        svc.registry.set_status(requested, by="ed", at=T0, diversion=True)
    await feed(svc, space, Stream.GPS, "AMB12", gps("AMB12", 1, AT_CHPG))
    await feed(svc, space, Stream.PREALERT, "AMB12", prealert("AMB12", "A-1", requested_hospital_id=requested))
    assert decoded(space, link)[0].hospital_id == expected  # type: ignore[attr-defined]
    record = svc.repo.alert("A-1")
    assert record is not None
    assert event in [e.kind for e in record.timeline]


async def test_acks_move_the_state_forward_only_and_are_relayed(
    service: tuple[DispatchService, RecordingLink], space: TopicSpace
) -> None:
    svc, link = service
    await feed(svc, space, Stream.PREALERT, "AMB12", prealert("AMB12", "A-1"))

    def ack(state: AlertState, seq: int, hospital: str = "MC-CCM", alert_id: str = "A-1") -> AlertAck:
        return AlertAck(
            unit_id="AMB12", seq=seq, sent_at=T0, alert_id=alert_id, hospital_id=hospital, state=state, at=T0
        )

    await feed(svc, space, Stream.ACK, "MC-CCM", ack(AlertState.ON_BOARD, 0))
    await feed(svc, space, Stream.ACK, "MC-CCM", ack(AlertState.ACKNOWLEDGED, 1))
    await feed(svc, space, Stream.ACK, "MC-CCM", ack(AlertState.ON_BOARD, 2))  # late: must not undo
    await feed(svc, space, Stream.ACK, "MC-CCM", ack(AlertState.ACKNOWLEDGED, 3, alert_id="NOPE"))
    await feed(svc, space, Stream.ACK, "MC-CHPG", ack(AlertState.ACKNOWLEDGED, 4, hospital="MC-CHPG"))
    notices = [m for m in decoded(space, link) if isinstance(m, Notice) and m.kind is NoticeKind.ALERT_STATE]
    assert [n.alert_state for n in notices] == [AlertState.ON_BOARD, AlertState.ACKNOWLEDGED]
    record = svc.repo.alert("A-1")
    assert record is not None
    assert record.state is AlertState.ACKNOWLEDGED
    assert len(record.acks) == 3
    assert svc.rejected["unknown_alert"] == 1
    assert svc.rejected["wrong_hospital"] == 1


async def test_status_and_gps_update_the_unit(
    service: tuple[DispatchService, RecordingLink], space: TopicSpace
) -> None:
    svc, _ = service
    await feed(svc, space, Stream.GPS, "AMB12", gps("AMB12", 2, AT_CHPG))
    await feed(svc, space, Stream.GPS, "AMB12", gps("AMB12", 1, (43.74, 7.42), at=T0 - timedelta(minutes=1)))
    await feed(svc, space, Stream.GPS, "AMB12", gps("AMB12", 3, None, at=T0 + timedelta(seconds=1)))
    status = Status(unit_id="AMB12", seq=0, sent_at=T0, status=CrewStatus.AVAILABLE, at=T0)
    await feed(svc, space, Stream.STATUS, "AMB12", status)
    unit = svc.repo.find_unit("AMB12")
    assert unit is not None
    assert unit.position_deg == AT_CHPG  # the older fix did not replace it; no-fix kept the last known one
    assert not unit.gps_fix
    assert unit.available


async def test_malformed_messages_are_counted_by_reason_and_the_loop_goes_on(
    service: tuple[DispatchService, RecordingLink], space: TopicSpace, caplog: pytest.LogCaptureFixture
) -> None:
    svc, _ = service
    topic = space.topic(Stream.PREALERT, "AMB12")
    good = encode(Stream.PREALERT, prealert("AMB12", "A-1"))
    secret = b'{"schema_version":1,"unit_id":"AMB12","note":"SECRET-HEALTH-DATA"'
    with caplog.at_level(logging.DEBUG):
        await svc.handle(topic, secret)  # truncated JSON
        await svc.handle(topic, b"\xff\xfe")  # not UTF-8
        await svc.handle(topic, b"x" * 20_000)  # over the stream's limit
        await svc.handle(space.topic(Stream.PREALERT, "AMB99"), good)  # id in payload != id in topic
        await svc.handle("elsewhere/ems/v1/unit/AMB12/prealert", good)  # outside the topic space
        await svc.handle(topic, good.replace(b'"case_type":"stemi"', b'"case_type":"flu"'))
        await svc.handle(
            space.topic(Stream.GPS, "AMB12"),
            b'{"schema_version":1,"unit_id":"AMB12","seq":0,'
            b'"sent_at":"2025-03-14T09:30:00Z","fix":true,"lat_deg":0,"lon_deg":0}',
        )
        vitals = Vitals(unit_id="AMB12", seq=0, sent_at=T0, measured_at=T0, heart_rate_bpm=80)
        await svc.handle(space.topic(Stream.VITALS, "AMB12"), encode(Stream.VITALS, vitals))  # not dispatch's
        await svc.handle(topic, good)
    assert svc.rejected == {
        "bad_json": 1,
        "not_utf8": 1,
        "too_large": 1,
        "id_mismatch": 1,
        "bad_topic": 1,
        "invalid_fields": 1,
        "null_island": 1,
        "unexpected_stream": 1,
    }
    assert svc.processed["prealert"] == 1
    assert svc.repo.alert("A-1") is not None
    assert "SECRET" not in caplog.text
    assert "crew note" not in caplog.text


async def test_publish_failure_is_recorded_and_retried_on_replay(
    service: tuple[DispatchService, RecordingLink], space: TopicSpace
) -> None:
    svc, link = service
    link.fail = True
    await feed(svc, space, Stream.PREALERT, "AMB12", prealert("AMB12", "A-1"))
    record = svc.repo.alert("A-1")
    assert record is not None
    assert not record.alert_published
    assert EventKind.PUBLISH_FAILED in [e.kind for e in record.timeline]
    link.fail = False
    await feed(svc, space, Stream.PREALERT, "AMB12", prealert("AMB12", "A-1", seq=1))
    assert record.alert_published
    assert [type(m).__name__ for m in decoded(space, link)] == ["HospitalAlert", "Notice"]


async def test_receive_callback_only_enqueues_while_the_worker_is_stalled(
    service: tuple[DispatchService, RecordingLink], space: TopicSpace
) -> None:
    """FF-01: a stalled handler never holds up the MQTT receive path (it only enqueues)."""
    svc, _ = service

    class Msg:
        def __init__(self, seq: int) -> None:
            self.topic = space.topic(Stream.GPS, "AMB12")
            self.payload = encode(Stream.GPS, gps("AMB12", seq, AT_CHPG))

    durations = []
    for seq in range(200):  # nobody consumes the queue: the worker is "stalled"
        started = time.perf_counter()
        await svc._on_message(Msg(seq))  # type: ignore[arg-type]
        durations.append(time.perf_counter() - started)
    assert max(durations) < 0.05
    assert svc.stats().queue_depth == 200
