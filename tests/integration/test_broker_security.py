"""The shipped broker configurations against real Mosquitto processes (issue 7; FF-02, FF-04, FF-19).

Production-like part: a private Mosquitto started from ``production.conf.template`` with credentials made by
``broker_config.provision`` (mutual-TLS listener + TLS password listener, generated ACL, CRL).  Development part:
``dev.conf`` with only its port, data directory and user changed.

"Nothing was delivered" is never concluded from a SUBACK or from waiting a while: each negative check is closed by a
barrier, a legitimate message that the same receiver gets *after* anything the forbidden one would have produced.
Mosquitto handles every client's packets in order on one thread, so once a publisher's later QoS 1 PUBACK (or the
receiver's barrier) is in, a forbidden message would already have been queued ahead of it.

Payloads in the ACL tests are opaque markers, never health data; the FF-19/FF-02 tests send real ``Vitals``.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker_config import STREAMS, CrewStatus, Scope, Status, Stream, TopicSpace, Vitals, decode_as, encode
from broker_config.acl import UNIT_STREAMS
from broker_config.broker_check import (
    broker_user,
    check_config,
    check_persistence_dir,
    log_warnings,
    override_options,
    render_config,
    template_text,
)
from broker_config.embedded import free_port
from broker_config.provision import ProvisionResult, add_unit, provision, revoke

pytestmark = pytest.mark.integration

UNITS = ["AMB1", "AMB2"]
SERVICES = ["ingest", "dispatch", "board"]
HOSPITAL = "CITYHOSP"
ROOT_WARNING = {"should not be run as root": "the tests run as root; production drops to the broker user"}
T0 = datetime(2026, 11, 30, 9, 30, tzinfo=UTC)


class BrokerProcess(Protocol):
    """What the ``private_mosquitto`` factory of conftest.py returns."""

    port: int
    workdir: Path
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None

    def start(self) -> None: ...

    def stop(self) -> None: ...


# --- raw MQTT probe: what the broker answers to a CONNECT ----------------------------------------------------


def _utf8(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("!H", len(data)) + data


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, username: str | None = None, password: str | None = None) -> bytes:
    """An MQTT 3.1.1 CONNECT with clean session and a 30 s keepalive."""
    flags = 0x02
    payload = _utf8(client_id)
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
    if password is not None:
        flags |= 0x40
        payload += _utf8(password)
    body = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", 30) + payload
    return b"\x10" + _remaining_length(len(body)) + body


def probe(
    port: int, context: ssl.SSLContext | None, *, username: str | None = None, password: str | None = None
) -> int | None:
    """The CONNACK return code, or None when the broker closed the connection without one (TLS or protocol refusal).

    Raises TimeoutError if the broker neither answers nor closes within 5 s.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock: socket.socket = raw
    try:
        if context is not None:
            sock = context.wrap_socket(raw, server_hostname="localhost")
        sock.sendall(connect_packet(f"probe-{uuid.uuid4().hex[:8]}", username, password))
        data = b""
        while len(data) < 4:
            chunk = sock.recv(4 - len(data))
            if not chunk:
                return None
            data += chunk
    except (ssl.SSLError, ConnectionError):
        return None
    finally:
        sock.close()
    assert data[:2] == b"\x20\x02", "a CONNACK"
    return data[3]


# --- receiving without sleeping ------------------------------------------------------------------------------


@dataclass
class Inbox:
    """Everything one client received, and a way to wait for a condition on it (an event, never the clock)."""

    messages: list[tuple[str, bytes]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def pump(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self.messages.append((str(message.topic), bytes(message.payload)))
            self._changed.set()

    async def wait_for(self, predicate: Callable[[list[tuple[str, bytes]]], bool], timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate(self.messages):
                self._changed.clear()
                await self._changed.wait()

    async def wait_payload(self, payload: bytes, timeout_s: float = 5.0) -> None:
        await self.wait_for(lambda msgs: any(p == payload for _, p in msgs), timeout_s)

    def payloads(self) -> list[bytes]:
        return [p for _, p in self.messages]


@contextlib.asynccontextmanager
async def receiving(client: aiomqtt.Client) -> AsyncIterator[Inbox]:
    inbox = Inbox()
    task = asyncio.create_task(inbox.pump(client))
    try:
        yield inbox
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- the production-like broker ------------------------------------------------------------------------------


@dataclass
class SecureBroker:
    proc: BrokerProcess
    pki: ProvisionResult
    space: TopicSpace
    password_port: int

    @property
    def port(self) -> int:
        return self.proc.port

    def tls(self, account: str | None = None, *, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        """A client TLS context trusting the fleet CA, with ``account``'s certificate (or ``cert``), or none."""
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        if account is not None:
            creds = self.pki.clients[account]
            cert = (creds.cert_file, creds.key_file)
        if cert is not None:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        return context

    def client(self, account: str, *, cert: tuple[Path, Path] | None = None) -> aiomqtt.Client:
        """A client of the mutual-TLS listener authenticated by ``account``'s certificate (CN = username)."""
        return aiomqtt.Client(
            "127.0.0.1",
            self.port,
            identifier=f"{account}-{uuid.uuid4().hex[:6]}",
            tls_context=self.tls(None if cert else account, cert=cert),
            timeout=5,
        )

    async def reload(self) -> None:
        """SIGHUP, then wait until the broker logged the reload (it applies it before serving anything else)."""
        before = self.proc.log.read_text().count("Reloading config")
        assert self.proc.proc is not None
        self.proc.proc.send_signal(signal.SIGHUP)
        await wait_for_log(self.proc, lambda text: text.count("Reloading config") > before)


async def wait_for_log(proc: BrokerProcess, predicate: Callable[[str], bool], timeout_s: float = 5.0) -> str:
    """Poll the broker's log until ``predicate`` holds, within a deadline."""
    async with asyncio.timeout(timeout_s):
        while True:
            text = proc.log.read_text()
            if predicate(text):
                return text
            await asyncio.sleep(0.01)


def production_config(pki_dir: Path, password_port: int) -> str:
    """The production template with the test's paths; ``{port}`` and ``{dir}`` are left to the fixture."""
    return render_config(
        template_text("production.conf.template"),
        password_port=password_port,
        bind_address="127.0.0.1",
        pki_dir=pki_dir,
        data_dir="{dir}",
        user=getpass.getuser(),
    )


@pytest.fixture
def secure_broker(
    private_mosquitto: Callable[[str], BrokerProcess], tmp_path: Path, topic_space: TopicSpace
) -> SecureBroker:
    pki = provision(tmp_path / "pki", UNITS, SERVICES, space=topic_space)
    password_port = free_port()
    proc = private_mosquitto(production_config(pki.out_dir, password_port))
    check_config(proc.config, space=topic_space)  # the start-up check passes the rendered configuration
    proc.start()
    return SecureBroker(proc, pki, topic_space, password_port)


def marker(text: str) -> bytes:
    return f"{text}-{uuid.uuid4().hex[:6]}".encode()


# --- authentication ------------------------------------------------------------------------------------------


def test_anonymous_and_wrong_credentials_are_refused(secure_broker: SecureBroker) -> None:
    b = secure_broker
    # Mutual-TLS listener: no client certificate, no connection at all.
    assert probe(b.port, b.tls()) is None
    # Password listener: no username, wrong password, unknown user -> CONNACK 5 (not authorised).
    assert probe(b.password_port, b.tls()) == 5
    assert probe(b.password_port, b.tls(), username="AMB1", password="guess") == 5
    assert probe(b.password_port, b.tls(), username="AMB9", password=b.pki.clients["AMB1"].password()) == 5
    # A certificate from another CA (same CN) is not a fleet certificate.
    other = provision(b.pki.out_dir.parent / "other-ca", ["AMB1"], [])
    stranger = (other.clients["AMB1"].cert_file, other.clients["AMB1"].key_file)
    assert probe(b.port, b.tls(cert=stranger)) is None
    # Positive controls: the same probe connects with real credentials (so None above means "refused").
    assert probe(b.port, b.tls("AMB1")) == 0
    assert probe(b.password_port, b.tls(), username="AMB1", password=b.pki.clients["AMB1"].password()) == 0
    assert probe(b.password_port, b.tls(), username="board", password=b.pki.clients["board"].password()) == 0


def test_plain_tcp_to_the_tls_listeners_fails(secure_broker: SecureBroker) -> None:
    b = secure_broker
    assert probe(b.port, None) is None
    assert probe(b.password_port, None, username="AMB1", password=b.pki.clients["AMB1"].password()) is None
    log = b.proc.log.read_text()
    assert "wrong version number" in log or "Protocol error" in log


# --- ACL: what each credential can publish and receive ------------------------------------------------------


async def test_unit_a_cannot_publish_into_unit_bs_topics(secure_broker: SecureBroker) -> None:
    b, space = secure_broker, secure_broker.space
    async with (
        b.client("ingest") as ingest,
        b.client("AMB2") as unit_b,
        b.client("AMB1") as unit_a,
        receiving(ingest) as ingest_inbox,
        receiving(unit_b) as b_inbox,
    ):
        await ingest.subscribe(space.all_of_scope(Scope.UNIT), qos=1)
        await unit_b.subscribe(space.topic(Stream.NOTICE, "AMB2"), qos=1)
        legit_b = marker("AMB2-own")
        await unit_b.publish(space.unit("AMB2", Stream.VITALS), legit_b, qos=1)
        await ingest_inbox.wait_payload(legit_b)  # the observer does see AMB2's topics

        forged = marker("forged-by-AMB1")
        for stream in sorted(UNIT_STREAMS):
            await unit_a.publish(space.unit("AMB2", stream), forged, qos=STREAMS[stream].qos)
        await unit_a.publish(space.topic(Stream.NOTICE, "AMB2"), forged, qos=1)  # "drive to another hospital"
        barrier = marker("AMB1-own")
        await unit_a.publish(space.unit("AMB1", Stream.VITALS), barrier, qos=1)
        await ingest_inbox.wait_payload(barrier)
        async with b.client("dispatch") as dispatch:
            notice_barrier = marker("dispatch-notice")
            await dispatch.publish(space.topic(Stream.NOTICE, "AMB2"), notice_barrier, qos=1)
            await b_inbox.wait_payload(notice_barrier)

        assert forged not in ingest_inbox.payloads()
        assert b_inbox.payloads() == [notice_barrier]


async def test_unit_a_cannot_read_unit_bs_topics(secure_broker: SecureBroker) -> None:
    b, space = secure_broker, secure_broker.space
    async with (
        b.client("ingest") as ingest,
        b.client("AMB1") as unit_a,
        b.client("AMB2") as unit_b,
        b.client("dispatch") as dispatch,
        receiving(ingest) as ingest_inbox,
        receiving(unit_a) as a_inbox,
    ):
        await ingest.subscribe(space.all_of_scope(Scope.UNIT), qos=1)
        # Every way of asking: B's topics one by one, the all-units filter, B's notice, everything.
        subscriptions = [(space.unit("AMB2", s), STREAMS[s].qos) for s in sorted(UNIT_STREAMS)]
        subscriptions += [
            (space.all_of_scope(Scope.UNIT), 1),
            (space.topic(Stream.NOTICE, "AMB2"), 1),
            (space.filter(Stream.NOTICE), 1),
            ("#", 1),
            (space.topic(Stream.NOTICE, "AMB1"), 1),
        ]
        await unit_a.subscribe(subscriptions)

        secret = marker("AMB2-data")
        for stream in sorted(UNIT_STREAMS):
            await unit_b.publish(space.unit("AMB2", stream), secret, qos=STREAMS[stream].qos)
        await dispatch.publish(space.topic(Stream.NOTICE, "AMB2"), secret, qos=1)
        await ingest_inbox.wait_for(lambda msgs: sum(p == secret for _, p in msgs) == len(UNIT_STREAMS))

        own_notice = marker("AMB1-notice")
        await dispatch.publish(space.topic(Stream.NOTICE, "AMB1"), own_notice, qos=1)
        await a_inbox.wait_payload(own_notice)
        assert a_inbox.payloads() == [own_notice], "the unit received something it may not read"


async def test_board_credentials_cannot_publish_unit_data(secure_broker: SecureBroker) -> None:
    b, space = secure_broker, secure_broker.space
    async with (
        b.client("ingest") as ingest,
        b.client("dispatch") as dispatch,
        b.client("AMB1") as unit,
        b.client("board") as board,
        receiving(ingest) as ingest_inbox,
        receiving(dispatch) as dispatch_inbox,
        receiving(unit) as unit_inbox,
    ):
        await ingest.subscribe(space.all_of_scope(Scope.UNIT), qos=1)
        await dispatch.subscribe([(space.filter(Stream.ACK), 1), (space.filter(Stream.PREALERT), 1)])
        await unit.subscribe(space.topic(Stream.NOTICE, "AMB1"), qos=1)

        forged = marker("forged-by-board")
        for stream in sorted(UNIT_STREAMS):
            await board.publish(space.unit("AMB1", stream), forged, qos=STREAMS[stream].qos)
        await board.publish(space.topic(Stream.NOTICE, "AMB1"), forged, qos=1)
        ack = marker("board-ack")
        await board.publish(space.topic(Stream.ACK, HOSPITAL), ack, qos=1)  # what the board may publish

        await dispatch_inbox.wait_payload(ack)
        barrier = marker("AMB1-own")
        await unit.publish(space.unit("AMB1", Stream.VITALS), barrier, qos=1)
        await ingest_inbox.wait_payload(barrier)
        notice = marker("dispatch-notice")
        await dispatch.publish(space.topic(Stream.NOTICE, "AMB1"), notice, qos=1)
        await unit_inbox.wait_payload(notice)

        assert ingest_inbox.payloads() == [barrier]
        assert dispatch_inbox.payloads() == [ack]
        assert unit_inbox.payloads() == [notice]


# --- revocation and reload ------------------------------------------------------------------------------------


async def test_revoked_certificate_is_refused_after_sighup_and_others_carry_on(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    b, space = secure_broker, secure_broker.space
    # What a stolen vehicle still holds after the revocation: its certificate, key and password.
    stolen = tmp_path / "stolen"
    stolen.mkdir()
    creds = b.pki.clients["AMB1"]
    stolen_cert = (Path(shutil.copy(creds.cert_file, stolen)), Path(shutil.copy(creds.key_file, stolen)))
    stolen_password = creds.password()

    async with (
        b.client("ingest") as ingest,
        b.client("AMB1") as live_a,
        b.client("AMB2") as live_b,
        receiving(ingest) as inbox,
    ):
        await ingest.subscribe(space.all_of_scope(Scope.UNIT), qos=1)

        revoke(b.pki.out_dir, "AMB1")
        new_unit = add_unit(b.pki.out_dir, "AMB3")
        # Files alone change nothing: Mosquitto reads them at start and on SIGHUP.
        assert await asyncio.to_thread(probe, b.port, b.tls(cert=stolen_cert)) == 0

        await b.reload()

        tls_refused = await asyncio.to_thread(probe, b.port, b.tls(cert=stolen_cert))
        password_refused = await asyncio.to_thread(
            probe, b.password_port, b.tls(), username="AMB1", password=stolen_password
        )
        assert tls_refused is None, "the revoked certificate still completes a connection"
        assert password_refused == 5
        assert "certificate verify failed" in b.proc.log.read_text()
        assert await asyncio.to_thread(probe, b.port, b.tls("AMB2")) == 0

        # The revoked unit's session that was open before the reload has lost its rights at once...
        from_revoked = marker("from-revoked-live-session")
        await live_a.publish(space.unit("AMB1", Stream.VITALS), from_revoked, qos=1)
        # ...while the other units' sessions were not dropped by the reload, and the new unit is in.
        from_b = marker("AMB2-after-reload")
        await live_b.publish(space.unit("AMB2", Stream.VITALS), from_b, qos=1)
        async with b.client("AMB3", cert=(new_unit.cert_file, new_unit.key_file)) as unit_c:
            from_c = marker("AMB3-new")
            await unit_c.publish(space.unit("AMB3", Stream.VITALS), from_c, qos=1)
        await inbox.wait_for(lambda msgs: {from_b, from_c} <= {p for _, p in msgs})
        assert from_revoked not in inbox.payloads()


# --- FF-04: no ACL warning at start-up ------------------------------------------------------------------------


def test_startup_log_has_no_acl_warning(secure_broker: SecureBroker) -> None:
    log = secure_broker.proc.log.read_text()
    assert "Opening ipv4 listen socket" in log, "the log was captured"
    assert log_warnings(log, ignore=ROOT_WARNING) == []


def test_the_log_check_catches_a_pattern_without_substitution(
    private_mosquitto: Callable[[str], BrokerProcess], tmp_path: Path, topic_space: TopicSpace
) -> None:
    """Control for the test above: the FF-04 ACL does produce the warning the check looks for."""
    pki = provision(tmp_path / "pki", UNITS, SERVICES, space=topic_space)
    bad_acl = tmp_path / "bad-acl"
    bad_acl.write_text(f"pattern read {topic_space.filter(Stream.VITALS)}\n" + pki.acl_file.read_text())
    config = override_options(production_config(pki.out_dir, free_port()), acl_file=str(bad_acl))
    proc = private_mosquitto(config)
    proc.start()
    warnings = log_warnings(proc.log.read_text(), ignore=ROOT_WARNING)
    assert any("does not contain '%c' or '%u'" in line for line in warnings)


# --- FF-19 and FF-02 with the development configuration ------------------------------------------------------

PUBLISHED = 5_000


def dev_config(**overrides: str | None) -> str:
    """dev.conf with a free port, the fixture's directory for persistence and the test's own account."""
    return override_options(
        template_text("dev.conf"),
        listener="{port} 127.0.0.1",
        persistence_location="{dir}/",
        user=getpass.getuser(),
        **overrides,
    )


@contextlib.contextmanager
def started(proc: BrokerProcess) -> Iterator[BrokerProcess]:
    check_persistence_dir(proc.workdir, user=broker_user(getpass.getuser()))  # FF-02 start-up check
    proc.start()
    yield proc


def plain_client(proc: BrokerProcess, identifier: str, *, clean_session: bool = True) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        proc.port,
        identifier=identifier,
        clean_session=clean_session,
        timeout=10,
        max_inflight_messages=100,
    )


def vitals(seq: int) -> bytes:
    return encode(
        Stream.VITALS,
        Vitals(unit_id="AMB12", seq=seq, sent_at=T0, measured_at=T0, heart_rate_bpm=60 + seq % 60),
    )


def _publish_all(port: int, topic: str, payloads: list[bytes]) -> None:
    """QoS 1 through paho's own network thread, pipelined; returns once every PUBACK is in (bounded waits)."""
    agent = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"agent-AMB12-{uuid.uuid4().hex[:6]}")
    agent.max_inflight_messages_set(100)
    connected = threading.Event()
    agent.on_connect = lambda *_: connected.set()
    agent.connect("127.0.0.1", port)
    agent.loop_start()
    try:
        assert connected.wait(5), "no CONNACK"
        sent = [agent.publish(topic, payload, qos=1) for payload in payloads]
        for info in sent:
            info.wait_for_publish(timeout=20)
        assert all(info.is_published() for info in sent), "a PUBACK is missing"
    finally:
        agent.disconnect()
        agent.loop_stop()


async def publish_vitals(proc: BrokerProcess, space: TopicSpace, seqs: range) -> None:
    """Publish vitals ``seqs`` at QoS 1; when this returns the broker has acknowledged every one.

    paho in a worker thread rather than aiomqtt: aiomqtt awaits each PUBACK (about 2.5 ms apiece here), paho
    pipelines them (5,000 in about 1 s).
    """
    payloads = [vitals(seq) for seq in seqs]
    await asyncio.to_thread(_publish_all, proc.port, space.unit("AMB12", Stream.VITALS), payloads)


async def park_persistent_subscriber(proc: BrokerProcess, space: TopicSpace, client_id: str) -> None:
    """FF-19/FF-02 scenario: the ingest subscribes with a persistent session, then goes away."""
    async with plain_client(proc, client_id, clean_session=False) as ingest:
        await ingest.subscribe(space.filter(Stream.VITALS), qos=1)


@dataclass
class Sequences:
    """The vitals sequence numbers an inbox holds; each message is decoded once (waits re-check often)."""

    space: TopicSpace
    inbox: Inbox
    seen: set[int] = field(default_factory=set)
    _decoded: int = 0

    def __call__(self, _: object = None) -> set[int]:
        topic = self.space.unit("AMB12", Stream.VITALS)
        for t, p in self.inbox.messages[self._decoded :]:
            if t == topic:
                self.seen.add(decode_as(Vitals, self.space, t, p).seq)
        self._decoded = len(self.inbox.messages)
        return self.seen


async def test_ff19_offline_persistent_subscriber_gets_all_5000_queued_messages(
    private_mosquitto: Callable[[str], BrokerProcess], topic_space: TopicSpace
) -> None:
    with started(private_mosquitto(dev_config())) as proc:
        await park_persistent_subscriber(proc, topic_space, "ingest-ff19")
        await publish_vitals(proc, topic_space, range(PUBLISHED))
        async with plain_client(proc, "ingest-ff19", clean_session=False) as ingest, receiving(ingest) as inbox:
            seqs = Sequences(topic_space, inbox)
            await inbox.wait_for(lambda _: len(seqs()) >= PUBLISHED, timeout_s=30)
        assert seqs() == set(range(PUBLISHED))


async def test_ff19_control_mosquittos_default_queue_drops_all_but_1000(
    private_mosquitto: Callable[[str], BrokerProcess], topic_space: TopicSpace
) -> None:
    """The field failure itself, so the test above is known to be able to fail."""
    with started(private_mosquitto(dev_config(max_queued_messages=None))) as proc:
        await park_persistent_subscriber(proc, topic_space, "ingest-ff19")
        await publish_vitals(proc, topic_space, range(PUBLISHED))
        async with plain_client(proc, "ingest-ff19", clean_session=False) as ingest, receiving(ingest) as inbox:
            seqs = Sequences(topic_space, inbox)
            await inbox.wait_for(lambda _: len(seqs()) >= 1000, timeout_s=30)
            # Barrier: anything still queued was queued before this one and arrives ahead of it.
            await publish_vitals(proc, topic_space, range(PUBLISHED, PUBLISHED + 1))
            await inbox.wait_for(lambda _: PUBLISHED in seqs(), timeout_s=10)
        assert seqs() == set(range(1000)) | {PUBLISHED}


async def test_ff02_graceful_restart_keeps_the_persistent_session_and_its_queue(
    private_mosquitto: Callable[[str], BrokerProcess], topic_space: TopicSpace
) -> None:
    status_topic = topic_space.unit("AMB12", Stream.STATUS)
    status = encode(Stream.STATUS, Status(unit_id="AMB12", seq=1, sent_at=T0, status=CrewStatus.ON_SCENE, at=T0))
    with started(private_mosquitto(dev_config())) as proc:
        await park_persistent_subscriber(proc, topic_space, "ingest-ff02")
        await publish_vitals(proc, topic_space, range(200))
        async with plain_client(proc, "agent-AMB12-status") as agent:
            await agent.publish(status_topic, status, qos=1, retain=True)

        proc.stop()  # SIGTERM: Mosquitto saves its database and exits
        assert (proc.workdir / "mosquitto.db").is_file()
        proc.start()

        # Same client id, clean session off, no new SUBSCRIBE: the session and its queue came back.
        async with plain_client(proc, "ingest-ff02", clean_session=False) as ingest, receiving(ingest) as inbox:
            seqs = Sequences(topic_space, inbox)
            await inbox.wait_for(lambda _: len(seqs()) >= 200, timeout_s=10)
        assert seqs() == set(range(200))
        # The retained status survived too (a board starting after the restart sees the unit at once).
        async with plain_client(proc, "board-late") as board, receiving(board) as board_inbox:
            await board.subscribe(topic_space.filter(Stream.STATUS), qos=1)
            await board_inbox.wait_payload(status)


async def test_ff02_control_without_persistence_a_restart_forgets_the_session(
    private_mosquitto: Callable[[str], BrokerProcess], topic_space: TopicSpace
) -> None:
    with started(private_mosquitto(dev_config(persistence="false"))) as proc:
        await park_persistent_subscriber(proc, topic_space, "ingest-ff02")
        await publish_vitals(proc, topic_space, range(200))
        proc.stop()
        proc.start()
        async with plain_client(proc, "ingest-ff02", clean_session=False) as ingest, receiving(ingest) as inbox:
            # Barrier on another stream: the vitals subscription and its queue would have been delivered first.
            await ingest.subscribe(topic_space.filter(Stream.GPS), qos=1)
            await publish_vitals(proc, topic_space, range(200, 201))
            async with plain_client(proc, "agent-AMB12-gps") as agent:
                await agent.publish(topic_space.unit("AMB12", Stream.GPS), b"barrier", qos=1)
            await inbox.wait_payload(b"barrier")
        assert Sequences(topic_space, inbox)() == set()
