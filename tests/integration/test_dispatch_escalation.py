"""Team activation over the real Mosquitto: an unacknowledged page escalates on the service's own timer; an
acknowledged one never does.  Short acknowledgement timeouts keep the test fast; it waits on messages, not sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import aiomqtt
import pytest

from broker_config import (
    STREAMS,
    ActivationState,
    AlertAck,
    AlertState,
    BrokerSettings,
    CaseType,
    Department,
    HospitalAlert,
    Notice,
    NoticeKind,
    PreAlert,
    Priority,
    Stream,
    TopicSpace,
    decode,
    encode,
    utc_now,
)
from dispatch.hospitals import HospitalRegistry
from dispatch.repository import EventKind
from dispatch.service import DispatchService

pytestmark = pytest.mark.integration

UNIT = "AMB21"
HOSPITAL = "MC-CCM"


class Endpoint:
    """The unit and the hospital board as one MQTT client; decoded messages land on a bounded queue."""

    def __init__(self, client: aiomqtt.Client, space: TopicSpace) -> None:
        self.client = client
        self.space = space
        self.inbox: asyncio.Queue[object] = asyncio.Queue(maxsize=100)

    async def reader(self) -> None:
        async for message in self.client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            await self.inbox.put(decode(self.space, str(message.topic), payload)[1])

    async def publish(self, stream: Stream, owner: str, model: object) -> None:
        spec = STREAMS[stream]
        await self.client.publish(self.space.topic(stream, owner), encode(stream, model), qos=spec.qos)  # type: ignore[arg-type]

    async def next_alert(self, timeout_s: float = 10) -> HospitalAlert:
        async with asyncio.timeout(timeout_s):
            while True:
                item = await self.inbox.get()
                if isinstance(item, HospitalAlert):
                    return item

    async def next_state_notice(self, timeout_s: float = 10) -> Notice:
        async with asyncio.timeout(timeout_s):
            while True:
                item = await self.inbox.get()
                if isinstance(item, Notice) and item.kind is NoticeKind.ALERT_STATE:
                    return item


@contextlib.asynccontextmanager
async def running(broker: BrokerSettings, space: TopicSpace, ack_timeout_s: float) -> AsyncIterator[DispatchService]:
    client_id = f"gh-dispatch-{uuid.uuid4().hex[:8]}"
    service = DispatchService(
        broker,
        space,
        HospitalRegistry.load(),
        None,
        client_id=client_id,
        ack_timeouts_s={Priority.HIGH: ack_timeout_s},
        escalation_tick_s=0.05,
    )
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(service.run())
        try:
            await service.wait_ready(10)
            yield service
        finally:
            task.cancel()
    async with aiomqtt.Client(broker.host, broker.port, identifier=client_id, clean_session=True):
        pass  # drop the persistent session this test created


@contextlib.asynccontextmanager
async def endpoint(broker: BrokerSettings, space: TopicSpace) -> AsyncIterator[Endpoint]:
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"test-ep-{uuid.uuid4().hex[:8]}") as client:
        ep = Endpoint(client, space)
        await client.subscribe([(space.filter(Stream.ALERT, HOSPITAL), 1), (space.filter(Stream.NOTICE, UNIT), 1)])
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(ep.reader())
            try:
                yield ep
            finally:
                task.cancel()


def stemi(alert_id: str) -> PreAlert:
    return PreAlert(unit_id=UNIT, seq=0, sent_at=utc_now(), alert_id=alert_id, case_type=CaseType.STEMI)


async def test_unacknowledged_cath_lab_escalates_to_backup_over_the_broker(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace
) -> None:
    async with (
        running(mqtt_settings, topic_space, ack_timeout_s=0.3) as service,
        endpoint(mqtt_settings, topic_space) as ep,
    ):
        await ep.publish(Stream.PREALERT, UNIT, stemi("ESC-1"))
        first = await ep.next_alert()
        assert [(a.department, a.level) for a in first.activations] == [
            (Department.CATH_LAB, "primary"),
            (Department.ED, "primary"),
        ]
        deadline = first.activations[0].escalate_at
        assert deadline is not None
        # the ED answers; the cath lab does not
        ack = AlertAck(
            unit_id=UNIT,
            seq=0,
            sent_at=utc_now(),
            alert_id="ESC-1",
            hospital_id=HOSPITAL,
            state=AlertState.ACKNOWLEDGED,
            department=Department.ED,
            by_role="ed_charge_nurse",
            at=utc_now(),
        )
        await ep.publish(Stream.ACK, HOSPITAL, ack)
        escalated = await ep.next_alert()
        while escalated.state is not AlertState.ESCALATED:
            escalated = await ep.next_alert()
        assert escalated.alert_id == "ESC-1"
        assert escalated.seq > first.seq
        cath = next(a for a in escalated.activations if a.department is Department.CATH_LAB)
        ed = next(a for a in escalated.activations if a.department is Department.ED)
        assert (cath.state, cath.level) == (ActivationState.ESCALATED, "backup")
        assert cath.escalate_at is not None
        assert cath.escalate_at > deadline
        assert ed.state is ActivationState.ACKNOWLEDGED
        notice = await ep.next_state_notice()
        while notice.alert_state is not AlertState.ESCALATED:
            notice = await ep.next_state_notice()
        assert any(a.level == "backup" for a in notice.activations)
        record = service.repo.alert("ESC-1")
        assert record is not None
        assert EventKind.ACTIVATION_ESCALATED in [e.kind for e in record.timeline]


async def test_acknowledged_activation_does_not_escalate(
    mqtt_settings: BrokerSettings, topic_space: TopicSpace
) -> None:
    async with (
        running(mqtt_settings, topic_space, ack_timeout_s=30) as service,
        endpoint(mqtt_settings, topic_space) as ep,
    ):
        await ep.publish(Stream.PREALERT, UNIT, stemi("ESC-2"))
        first = await ep.next_alert()
        ack = AlertAck(
            unit_id=UNIT,
            seq=0,
            sent_at=utc_now(),
            alert_id="ESC-2",
            hospital_id=HOSPITAL,
            state=AlertState.ACKNOWLEDGED,
            by_role="cath_lab_nurse",
            at=utc_now(),
        )
        await ep.publish(Stream.ACK, HOSPITAL, ack)
        notice = await ep.next_state_notice()
        assert notice.alert_state is AlertState.ACKNOWLEDGED
        assert all(a.state is ActivationState.ACKNOWLEDGED for a in notice.activations)
        # drive the timer far past every deadline: nothing escalates
        assert first.activations[0].escalate_at is not None
        assert await service.tick(first.activations[0].escalate_at + timedelta(hours=1)) == 0
        record = service.repo.alert("ESC-2")
        assert record is not None
        assert EventKind.ACTIVATION_ESCALATED not in [e.kind for e in record.timeline]
