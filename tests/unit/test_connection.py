"""The shared reconnect policy: capped exponential back-off with full jitter, reset only on CONNACK."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

from broker_config import BrokerSettings
from broker_config.connection import Backoff, MqttLink


def test_backoff_ceiling_doubles_up_to_the_cap_and_jitters_below_it() -> None:
    backoff = Backoff(0.5, 8.0, rng=random.Random(1))
    delays = [backoff.next_delay_s() for _ in range(12)]
    ceilings = [min(8.0, 0.5 * 2**i) for i in range(12)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert max(delays[6:]) <= 8.0
    backoff.reset()
    assert backoff.next_delay_s() <= 0.5


def test_a_fleet_does_not_reconnect_in_lockstep() -> None:
    """Full jitter spreads 200 units that lost the broker at the same moment over the whole window."""
    firsts = []
    for seed in range(200):
        b = Backoff(1.0, 30.0, rng=random.Random(seed))
        for _ in range(5):
            delay = b.next_delay_s()
        firsts.append(delay)
    buckets = {int(d // 2) for d in firsts}
    assert len(buckets) >= 7  # spread over [0, 16) s, not one spike


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(0, 1)
    with pytest.raises(ValueError):
        Backoff(2, 1)


def test_broker_url_parsing_keeps_secrets_out_of_the_loggable_url() -> None:
    s = BrokerSettings.from_url("mqtts://amb12:s3cret@broker.example:8883")
    assert (s.host, s.port, s.tls, s.username) == ("broker.example", 8883, True, "amb12")
    assert s.password is not None
    assert s.password.get_secret_value() == "s3cret"
    assert "s3cret" not in s.url
    assert "s3cret" not in repr(s)
    assert BrokerSettings.from_url("mqtt://127.0.0.1").port == 1883
    with pytest.raises(ValueError):
        BrokerSettings.from_url("http://x")


class _SwallowingClient:
    """Stands in for aiomqtt on Python 3.11, whose ``wait_for`` can swallow a cancellation that lands together
    with the PUBACK: ``publish`` then returns as if confirmed."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def publish(self, *args: object, **kwargs: object) -> None:
        self.entered.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)


async def test_a_cancel_swallowed_inside_publish_still_cancels_the_caller() -> None:
    link = MqttLink(BrokerSettings(), client_id="unit-test")
    client = _SwallowingClient()
    link._client = client  # type: ignore[assignment]
    task = asyncio.create_task(link.publish("t", b"x", qos=1, timeout_s=5))
    await client.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
