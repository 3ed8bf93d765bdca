"""Team activation: paging, acknowledgement per department, escalation on an injected clock (no broker)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from broker_config import (
    ActivationState,
    AlertAck,
    AlertState,
    BrokerSettings,
    CaseType,
    Department,
    Findings,
    HospitalAlert,
    Notice,
    NoticeKind,
    PreAlert,
    Priority,
    Stream,
    TopicSpace,
    decode,
    encode,
)
from broker_config.connection import NotConnectedError
from dispatch.activation import acknowledge, escalate_due, next_deadline, page
from dispatch.hospitals import HospitalRegistry
from dispatch.repository import EventKind
from dispatch.service import DispatchService

T0 = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class RecordingLink:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.connected = asyncio.Event()
        self.connected.set()
        self.sessions = 1
        self.fail = False

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False, timeout_s: float) -> None:
        if self.fail:
            raise NotConnectedError("down")
        self.published.append((topic, payload))

    async def wait_connected(self, timeout_s: float) -> None:
        if self.fail:
            raise TimeoutError


SPACE = TopicSpace("act-test/")


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def service(clock: Clock) -> tuple[DispatchService, RecordingLink]:
    svc = DispatchService(BrokerSettings(), SPACE, HospitalRegistry.load(), None, clock=clock)
    link = RecordingLink()
    svc.link = link  # type: ignore[assignment]
    return svc, link


def messages(link: RecordingLink) -> list[object]:
    return [decode(SPACE, topic, payload)[1] for topic, payload in link.published]


async def send_prealert(svc: DispatchService, case: CaseType = CaseType.STEMI, alert_id: str = "A-1") -> None:
    alert = PreAlert(unit_id="AMB12", seq=0, sent_at=T0, alert_id=alert_id, case_type=case, findings=Findings())
    await svc.handle(SPACE.topic(Stream.PREALERT, "AMB12"), encode(Stream.PREALERT, alert))


async def send_ack(svc: DispatchService, department: Department | None, seq: int = 0, at: datetime = T0) -> None:
    ack = AlertAck(
        unit_id="AMB12",
        seq=seq,
        sent_at=at,
        alert_id="A-1",
        hospital_id="MC-CCM",
        state=AlertState.ACKNOWLEDGED,
        department=department,
        by_role="cath_lab_nurse",
        at=at,
    )
    await svc.handle(SPACE.topic(Stream.ACK, "MC-CCM"), encode(Stream.ACK, ack))


# --- pure functions -----------------------------------------------------------------------------------------------


def test_page_sets_a_deadline_per_department_and_dedups() -> None:
    pages = page([Department.CATH_LAB, Department.ED, Department.ED], T0, 120)
    assert [p.department for p in pages] == [Department.CATH_LAB, Department.ED]
    assert all(p.level == "primary" and p.state is ActivationState.PAGED for p in pages)
    assert all(p.escalate_at == T0 + timedelta(seconds=120) for p in pages)
    assert next_deadline(pages) == T0 + timedelta(seconds=120)


def test_escalation_ladder_primary_backup_supervisor_then_repeats() -> None:
    pages = page([Department.CATH_LAB], T0, 60)
    now = T0
    levels = []
    for _ in range(4):
        assert next_deadline(pages) is not None
        now = next_deadline(pages)  # type: ignore[assignment]
        pages, steps = escalate_due(pages, now, 60)
        levels.append((steps[0].level, steps[0].repeat))
        assert pages[0].escalate_at == now + timedelta(seconds=60)
    assert levels == [("backup", False), ("supervisor", False), ("supervisor", True), ("supervisor", True)]
    assert pages[0].state is ActivationState.ESCALATED


def test_nothing_escalates_before_the_deadline_and_acknowledged_pages_never() -> None:
    pages = page([Department.CATH_LAB, Department.ED], T0, 60)
    same, steps = escalate_due(pages, T0 + timedelta(seconds=59), 60)
    assert steps == ()
    assert same == pages
    acked, done = acknowledge(pages, Department.CATH_LAB, T0, "nurse")
    assert done == (Department.CATH_LAB,)
    assert acked[0].escalate_at is None
    _, steps = escalate_due(acked, T0 + timedelta(hours=1), 60)
    assert [s.department for s in steps] == [Department.ED]
    _, again = acknowledge(acked, Department.CATH_LAB, T0, "nurse")
    assert again == ()


# --- the service ----------------------------------------------------------------------------------------------


async def test_unacknowledged_department_escalates_on_the_clock(
    service: tuple[DispatchService, RecordingLink], clock: Clock
) -> None:
    svc, link = service
    await send_prealert(svc)
    alert, notice = messages(link)
    assert isinstance(alert, HospitalAlert)
    assert isinstance(notice, Notice)
    assert [(a.department, a.level, a.escalate_at) for a in alert.activations] == [
        (Department.CATH_LAB, "primary", T0 + timedelta(seconds=120)),
        (Department.ED, "primary", T0 + timedelta(seconds=120)),
    ]
    assert notice.activations == alert.activations
    # the ED acknowledges, the cath lab does not
    await send_ack(svc, Department.ED, at=T0 + timedelta(seconds=30))
    assert await svc.tick(T0 + timedelta(seconds=119)) == 0
    link.published.clear()
    clock.now = T0 + timedelta(seconds=120)
    assert await svc.tick() == 1
    republished, state_notice = messages(link)
    assert isinstance(republished, HospitalAlert)
    assert republished.alert_id == "A-1"
    assert republished.seq > alert.seq
    assert republished.state is AlertState.ESCALATED
    cath, ed = republished.activations
    assert (cath.state, cath.level, cath.escalate_at) == (
        ActivationState.ESCALATED,
        "backup",
        T0 + timedelta(seconds=240),
    )
    assert ed.state is ActivationState.ACKNOWLEDGED
    assert ed.acknowledged_by_role == "cath_lab_nurse"
    assert isinstance(state_notice, Notice)
    assert state_notice.kind is NoticeKind.ALERT_STATE
    assert state_notice.activations == republished.activations
    # next step: supervisor, 120 s later
    assert await svc.tick(T0 + timedelta(seconds=240)) == 1
    record = svc.repo.alert("A-1")
    assert record is not None
    assert record.activations[0].level == "supervisor"
    escalations = [e.detail for e in record.timeline if e.kind is EventKind.ACTIVATION_ESCALATED]
    assert escalations == ["department=cath_lab level=backup", "department=cath_lab level=supervisor"]
    # the cath lab finally answers: no more escalation, the alert is acknowledged
    await send_ack(svc, Department.CATH_LAB, seq=1, at=T0 + timedelta(seconds=250))
    assert record.state is AlertState.ACKNOWLEDGED
    assert svc.next_escalation_at() is None
    assert await svc.tick(T0 + timedelta(hours=1)) == 0


async def test_acknowledgement_in_time_prevents_escalation(service: tuple[DispatchService, RecordingLink]) -> None:
    svc, link = service
    await send_prealert(svc)
    await send_ack(svc, None, at=T0 + timedelta(seconds=60))  # no department: acknowledges every page
    record = svc.repo.alert("A-1")
    assert record is not None
    assert record.state is AlertState.ACKNOWLEDGED
    assert all(a.state is ActivationState.ACKNOWLEDGED for a in record.activations)
    assert await svc.tick(T0 + timedelta(hours=2)) == 0
    assert EventKind.ACTIVATION_ESCALATED not in [e.kind for e in record.timeline]
    acked = [e.detail for e in record.timeline if e.kind is EventKind.ACTIVATION_ACKNOWLEDGED]
    assert acked == ["department=cath_lab role=cath_lab_nurse", "department=ed role=cath_lab_nurse"]
    kinds = [type(m).__name__ for m in messages(link)]
    assert kinds == ["HospitalAlert", "Notice", "HospitalAlert", "Notice"]


async def test_medical_inbound_pages_nobody_and_timeouts_follow_priority(clock: Clock) -> None:
    svc = DispatchService(
        BrokerSettings(), SPACE, HospitalRegistry.load(), None, clock=clock, ack_timeouts_s={Priority.HIGH: 5}
    )
    svc.link = RecordingLink()  # type: ignore[assignment]
    await send_prealert(svc, CaseType.MEDICAL, "M-1")
    medical = svc.repo.alert("M-1")
    assert medical is not None
    assert medical.activations == ()
    await send_prealert(svc, CaseType.STROKE, "S-1")
    stroke = svc.repo.alert("S-1")
    assert stroke is not None
    assert [a.department for a in stroke.activations] == [Department.STROKE_TEAM, Department.CT, Department.ED]
    assert svc.next_escalation_at() == T0 + timedelta(seconds=5)
    with pytest.raises(ValueError, match="positive"):
        DispatchService(BrokerSettings(), SPACE, HospitalRegistry.load(), None, ack_timeouts_s={Priority.LOW: 0})


async def test_escalation_is_recorded_even_when_the_broker_is_down(
    service: tuple[DispatchService, RecordingLink],
) -> None:
    svc, link = service
    await send_prealert(svc)
    link.fail = True
    assert await svc.tick(T0 + timedelta(seconds=120)) == 1
    record = svc.repo.alert("A-1")
    assert record is not None
    kinds = [e.kind for e in record.timeline]
    assert EventKind.ACTIVATION_ESCALATED in kinds
    assert kinds[-1] is EventKind.PUBLISH_FAILED


async def test_a_full_inbound_queue_pauses_receiving_and_drops_nothing() -> None:
    """A stalled worker never costs a message: the receive callback waits for room (the link stops reading the
    socket meanwhile), counts the stall once it outlasts ``enqueue_timeout_s``, and rejects nothing."""

    class Message:
        def __init__(self, n: int) -> None:
            self.topic = SPACE.topic(Stream.STATUS, f"amb{n}")
            self.payload = b"{}"

    svc = DispatchService(BrokerSettings(), SPACE, HospitalRegistry.load(), None, queue_size=1, enqueue_timeout_s=0.05)
    await svc._on_message(Message(1))
    second = asyncio.create_task(svc._on_message(Message(2)))
    await asyncio.sleep(0.2)
    assert not second.done()  # waiting for room, not dropped
    assert svc.stalls == 1
    assert svc._queue.get_nowait().topic.endswith("/amb1/status")
    await asyncio.wait_for(second, 5)
    assert svc._queue.get_nowait().topic.endswith("/amb2/status")
    assert "queue_full" not in svc.rejected
