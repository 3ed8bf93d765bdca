"""Shared fixtures: real services for integration tests, a unique topic space per test.

Services (defaults match the developer machines and CI):

* ``GOLDENHOUR_TEST_MQTT_URL`` (default ``mqtt://127.0.0.1:1883``): a real Mosquitto.
* ``GOLDENHOUR_TEST_PG_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``): a PostgreSQL server where
  the tests may create and drop databases.
* ``GOLDENHOUR_REQUIRE_SERVICES=1`` (set by ``.ci/run``): a missing service fails the test instead of skipping it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from broker_config import BrokerSettings, TopicSpace
from broker_config.embedded import EmbeddedBroker, free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
"""The larger shared real-data set, present on developer machines and CI; tests that need it skip without it."""

MQTT_URL = os.environ.get("GOLDENHOUR_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
PG_URL = os.environ.get("GOLDENHOUR_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUIRE_SERVICES = os.environ.get("GOLDENHOUR_REQUIRE_SERVICES") == "1"


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=1):
            return True
    except OSError:
        return False


def service_missing(what: str) -> None:
    """Skip (developer machine) or fail (CI, GOLDENHOUR_REQUIRE_SERVICES=1) for a missing service."""
    message = f"{what} is not reachable; start it or set its GOLDENHOUR_TEST_* URL"
    if REQUIRE_SERVICES:
        pytest.fail(message)
    pytest.skip(message)


def chromium_binary() -> str:
    """Debian's headless Chromium for the browser tests; skip (developer machine) or fail (CI) without it."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    service_missing("headless Chromium (apt-get install -y chromium)")
    raise AssertionError("unreachable")


def shared_data(relative: str) -> Path:
    """A path in the shared real-data set, or skip with the reason when a fresh clone does not have it."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared real data {relative} not present (only in the developers' data checkout)")
    return path


@pytest.fixture
def topic_space() -> TopicSpace:
    """A topic space no other test uses (no retained message of another test can leak in)."""
    return TopicSpace(prefix=f"test-{uuid.uuid4().hex[:12]}/")


@pytest.fixture
def mqtt_settings(topic_space: TopicSpace) -> BrokerSettings:
    """Settings for the real Mosquitto, reconnecting quickly."""
    if not _reachable(MQTT_URL, 1883):
        service_missing(f"Mosquitto at {MQTT_URL}")
    return BrokerSettings.from_url(MQTT_URL, reconnect_min_s=0.1, reconnect_max_s=1.0, keepalive_s=10)


@pytest.fixture
async def embedded_broker() -> AsyncIterator[BrokerSettings]:
    """An in-process amqtt broker on a free port (the demo's embedded default)."""
    async with EmbeddedBroker() as broker:
        yield BrokerSettings(host=broker.host, port=broker.port, reconnect_min_s=0.1, reconnect_max_s=1.0)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    if not _reachable(PG_URL, 5432):
        service_missing(f"PostgreSQL at {PG_URL}")
    import psycopg
    from psycopg import sql

    name = f"gh_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    parts = urlsplit(PG_URL)
    url = parts._replace(path=f"/{name}").geturl()
    try:
        yield url
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class MosquittoProcess:
    """A private Mosquitto on a free loopback port, started from a config text; can be stopped and restarted."""

    def __init__(self, config_text: str, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.config.write_text(config_text.replace("{port}", str(self.port)).replace("{dir}", str(workdir)))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        log = self.log.open("ab")
        self.proc = subprocess.Popen([binary, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            time.sleep(0.05)
        raise RuntimeError("private mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def settings(self) -> BrokerSettings:
        return BrokerSettings(host="127.0.0.1", port=self.port, reconnect_min_s=0.1, reconnect_max_s=1.0)


def _hand_to_broker_user(*dirs: Path) -> None:
    """Started as root, Mosquitto drops to the ``mosquitto`` user: its persistence folder must be that user's, or
    the broker loses every persistent session at shutdown with only a "Permission denied" line (FF-02)."""
    if os.geteuid() != 0:
        return
    import pwd

    try:
        pw = pwd.getpwnam("mosquitto")
    except KeyError:
        return
    for d in dirs:
        os.chown(d, pw.pw_uid, pw.pw_gid)
        d.chmod(0o755)


@pytest.fixture
def private_mosquitto() -> Iterator[type[MosquittoProcess]]:
    """Factory for private Mosquitto processes (for restart and configuration tests); all stopped at the end."""
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        service_missing("the mosquitto binary")
    started: list[MosquittoProcess] = []
    tmp = Path(tempfile.mkdtemp(prefix="gh-mosq-"))

    class _Factory(MosquittoProcess):
        def __init__(self, config_text: str) -> None:
            d = tmp / uuid.uuid4().hex[:8]
            d.mkdir()
            _hand_to_broker_user(tmp, d)
            super().__init__(config_text, d)
            started.append(self)

    yield _Factory
    for proc in started:
        proc.stop()
    shutil.rmtree(tmp, ignore_errors=True)
