"""Uplink budget of the vehicle: a token bucket on bytes, a delay-based bandwidth estimate, wire statistics.

Why a budget at all: a cellular uplink has deep buffers (modem, kernel socket buffer).  If the agent writes faster
than the link drains, every byte queues there, and a pre-alert written after them waits behind them - seconds on a
64 kbit/s link.  Pacing the sender just below the link rate keeps those buffers nearly empty, so the next
high-priority message goes out at once; what does not fit stays in the durable outbox, where the agent still
decides the order (:mod:`ambulance_agent.outbox`).

* :class:`TokenBucket`: bytes per second with a small burst.  Pre-alerts, status and availability may go into
  debt (they never wait for tokens); everything else waits until its bytes are covered.
* :class:`BandwidthEstimator`: "measured" mode.  The QoS 1 PUBACK round trip of each message includes the time
  its bytes spent queued in front of the link; the estimator keeps the minimum recent round trip as the base, and
  treats anything above it as queueing delay.  Queueing delay above ``target_delay_s`` cuts the rate
  multiplicatively (by ``decrease``, or by target/delay down to one half when the queue is deep); low delay while
  the sender was held back by the budget raises it additively in proportion to the bytes acknowledged
  (LEDBAT-like, RFC 6817's idea of a target queueing delay, with AIMD).  On a 64 kbit/s link it saw-tooths between
  about 50 % and 130 % of the link rate, using ~80 % of it on average; a configured budget uses all of it.
* :class:`WireStats`: messages and bytes confirmed on the wire per stream, and ECG bytes per sample (GHE1 header
  fields, see :mod:`broker_config.codec`).
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from broker_config import Stream

__all__ = ["MQTT_OVERHEAD_BYTES", "BandwidthEstimator", "StreamWire", "TokenBucket", "WireStats", "wire_size"]

MQTT_OVERHEAD_BYTES = 8 + 40
"""Per message on top of payload and topic: MQTT fixed header, topic length and packet id (<= 8 bytes), plus an
allowance for TCP/IPv4 headers (40 bytes) of the segment that carries it."""

_GHE1_N_LEADS = 6
_GHE1_N_SAMPLES = struct.Struct("<I")
_GHE1_N_SAMPLES_AT = 52


def wire_size(topic: str, payload: bytes) -> int:
    """Bytes a PUBLISH costs on the link (payload, topic, MQTT and TCP/IP overhead)."""
    return len(payload) + len(topic) + MQTT_OVERHEAD_BYTES


class TokenBucket:
    """A token bucket on bytes.

    Args:
        rate_bytes_s: refill rate (bytes per second, > 0).
        burst_bytes: bucket size; a message larger than the bucket is sent when the bucket is full (it then runs
            into debt, repaid before anything else of lower priority goes).
        monotonic: clock in seconds (injectable for tests).
    """

    def __init__(self, rate_bytes_s: float, burst_bytes: float, monotonic: Callable[[], float] = time.monotonic):
        if rate_bytes_s <= 0 or burst_bytes <= 0:
            raise ValueError("rate and burst must be > 0")
        self.rate_bytes_s = float(rate_bytes_s)
        self.burst_bytes = float(burst_bytes)
        self._monotonic = monotonic
        self._tokens = float(burst_bytes)
        self._at = monotonic()

    def _refill(self) -> None:
        now = self._monotonic()
        self._tokens = min(self.burst_bytes, self._tokens + (now - self._at) * self.rate_bytes_s)
        self._at = now

    @property
    def tokens(self) -> float:
        """Bytes that may go now (negative = debt)."""
        self._refill()
        return self._tokens

    def delay_s(self, size: int) -> float:
        """Seconds until ``size`` bytes may go (0 = now)."""
        self._refill()
        need = min(float(size), self.burst_bytes)
        return 0.0 if self._tokens >= need else (need - self._tokens) / self.rate_bytes_s

    def take(self, size: int) -> None:
        """Spend ``size`` bytes (may go into debt)."""
        self._refill()
        self._tokens -= size

    def set_rate(self, rate_bytes_s: float, burst_bytes: float | None = None) -> None:
        """Change the refill rate (and the bucket size)."""
        self._refill()
        self.rate_bytes_s = max(1.0, float(rate_bytes_s))
        if burst_bytes is not None:
            self.burst_bytes = max(1.0, float(burst_bytes))
            self._tokens = min(self._tokens, self.burst_bytes)


class BandwidthEstimator:
    """Delay-based rate estimate from PUBACK round trips (see the module docstring).

    Args:
        start_bytes_s: initial rate.
        min_bytes_s, max_bytes_s: bounds of the estimate.
        target_delay_s: queueing delay tolerated in front of the link (well under the 2 s pre-alert target).
        base_window_s: the base round trip is the minimum over this window (routes change, so it is forgotten).
        decrease: multiplicative decrease factor on congestion (at most once per ``target_delay_s`` + base RTT).
        increase_gain: additive increase per acknowledged byte while the budget held the sender back.
        monotonic: clock in seconds.
    """

    def __init__(
        self,
        start_bytes_s: float,
        *,
        min_bytes_s: float = 2_000.0,
        max_bytes_s: float = 1_250_000.0,
        target_delay_s: float = 0.25,
        base_window_s: float = 60.0,
        decrease: float = 0.75,
        increase_gain: float = 0.2,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < min_bytes_s <= start_bytes_s <= max_bytes_s:
            raise ValueError("need 0 < min <= start <= max")
        self.rate_bytes_s = float(start_bytes_s)
        self.min_bytes_s = min_bytes_s
        self.max_bytes_s = max_bytes_s
        self.target_delay_s = target_delay_s
        self.base_window_s = base_window_s
        self.decrease = decrease
        self.increase_gain = increase_gain
        self._monotonic = monotonic
        self._samples: deque[tuple[float, float]] = deque(maxlen=1024)
        self._acked: deque[tuple[float, int]] = deque(maxlen=4096)
        self._last_cut = -1e9
        self.last_delay_s = 0.0
        self.cuts = 0

    def delivery_rate_bytes_s(self, window_s: float = 1.0) -> float | None:
        """Bytes acknowledged per second over the last ``window_s`` (what the link really carried)."""
        now = self._monotonic()
        recent = [size for at, size in self._acked if now - at <= window_s]
        if len(recent) < 2:
            return None
        return sum(recent) / window_s

    @property
    def base_rtt_s(self) -> float | None:
        """Minimum round trip in the window (None before the first sample)."""
        return min((rtt for _, rtt in self._samples), default=None)

    def on_ack(self, size: int, rtt_s: float, limited: bool) -> None:
        """A PUBACK for ``size`` wire bytes after ``rtt_s``; ``limited``: the budget was holding messages back."""
        now = self._monotonic()
        while self._samples and now - self._samples[0][0] > self.base_window_s:
            self._samples.popleft()
        self._samples.append((now, rtt_s))
        self._acked.append((now, size))
        base = self.base_rtt_s or rtt_s
        self.last_delay_s = max(0.0, rtt_s - base)
        if self.last_delay_s > self.target_delay_s:
            if now - self._last_cut > self.target_delay_s + base:
                # The deeper the queue, the harder the cut (at most halving), so it drains within a few RTTs; and
                # never above what the link was seen to deliver while the queue built (it is the link's rate).
                factor = max(0.5, min(self.decrease, self.target_delay_s / self.last_delay_s))
                rate = self.rate_bytes_s * factor
                delivered = self.delivery_rate_bytes_s()
                if delivered is not None:
                    rate = min(rate, 0.9 * delivered)
                self.rate_bytes_s = max(self.min_bytes_s, rate)
                self._last_cut = now
                self.cuts += 1
        elif limited:
            headroom = 1.0 - self.last_delay_s / self.target_delay_s
            self.rate_bytes_s = min(self.max_bytes_s, self.rate_bytes_s + self.increase_gain * size * headroom)

    def on_timeout(self) -> None:
        """A publish was not confirmed in time: treat as heavy congestion."""
        now = self._monotonic()
        if now - self._last_cut > self.target_delay_s:
            self.rate_bytes_s = max(self.min_bytes_s, self.rate_bytes_s * self.decrease * self.decrease)
            self._last_cut = now
            self.cuts += 1


@dataclass(slots=True)
class StreamWire:
    """What one stream put on the wire (confirmed by the broker; QoS 0 video: handed to the socket)."""

    messages: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0
    samples: int = 0
    """ECG only: samples (all leads) carried."""

    @property
    def bytes_per_sample(self) -> float | None:
        """Payload bytes per ECG sample (headers included), None without samples."""
        return self.payload_bytes / self.samples if self.samples else None


@dataclass(slots=True)
class WireStats:
    """Per stream :class:`StreamWire` counters."""

    streams: dict[str, StreamWire] = field(default_factory=dict)

    def add(self, stream: Stream, topic: str, payload: bytes) -> None:
        """Count one confirmed message."""
        wire = self.streams.setdefault(stream.value, StreamWire())
        wire.messages += 1
        wire.payload_bytes += len(payload)
        wire.wire_bytes += wire_size(topic, payload)
        if stream is Stream.ECG and len(payload) >= _GHE1_N_SAMPLES_AT + 4:
            n_leads = payload[_GHE1_N_LEADS]
            (n_samples,) = _GHE1_N_SAMPLES.unpack_from(payload, _GHE1_N_SAMPLES_AT)
            wire.samples += n_leads * n_samples

    def ecg_bytes_per_sample(self) -> float | None:
        """ECG payload bytes per sample so far (None before the first chunk)."""
        wire = self.streams.get(Stream.ECG.value)
        return wire.bytes_per_sample if wire else None
