"""The MQTT topic grammar of GoldenHour, defined once for every producer and consumer.

Grammar (version 1)::

    {prefix}ems/v1/unit/{unit_id}/{stream}        unit -> everyone   (availability, status, vitals, ecg, gps,
                                                                       prealert, video)
    {prefix}ems/v1/dispatch/{unit_id}/{stream}    dispatch -> unit   (notice)
    {prefix}ems/v1/hospital/{hospital_id}/{stream} dispatch <-> ED   (alert: dispatch -> board, ack: board -> dispatch)
    {prefix}ems/v1/telemetry/{unit_id}/{stream}   store -> everyone  (gap, receipt)

Topics carry opaque ids only (``[A-Za-z0-9_-]{1,32}``), never a patient's name or any clinical value:
topics appear in broker logs and ACLs (DOMAIN.md section 11).

``prefix`` is empty in production.  Tests give every test its own prefix (``"t1234/"``) so that no test
ever sees retained messages left by another (the aiomqtt habit).

QoS and retain policy (one place, :data:`STREAMS`):

* ``availability``: QoS 1, retained.  Birth ``online`` published after (re)subscribing; last will
  ``offline`` (Sparkplug B / Home Assistant model).
* ``status``, ``gps``: QoS 1, retained, so a board or dispatcher that starts late sees every unit at once.
* ``receipt``: QoS 1, retained: the store's latest delivery receipt for a unit (what is durably stored).
* ``vitals``, ``ecg``, ``prealert``, ``notice``, ``alert``, ``ack``, ``gap``: QoS 1, not retained.
  ECG is QoS 1 (not QoS 0 as in some telemetry designs) because GoldenHour promises that every
  sequence number of every non-video stream reaches the store exactly once; duplicates that QoS 1 may
  bring are removed by the store's unique key on (unit, stream, seq).
* ``video``: QoS 0, never retained, lowest priority.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

import paho.mqtt.client as _paho

__all__ = [
    "ID_PATTERN",
    "SCHEMA_ROOT",
    "Scope",
    "Stream",
    "StreamSpec",
    "STREAMS",
    "TopicError",
    "TopicSpace",
    "ParsedTopic",
    "loggable",
    "valid_id",
]

SCHEMA_ROOT = "ems/v1"
"""Versioned root of the grammar.  A breaking change gets ``ems/v2``, published alongside during migration."""

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
"""Opaque id of a unit, hospital or service: letters, digits, ``_`` and ``-``; 1-32 characters."""


def loggable(topic: str, limit: int = 160) -> str:
    """A topic made safe to log: control characters escaped (no forged log lines), cut to ``limit`` characters."""
    text = topic[:limit].encode("unicode_escape").decode("ascii")
    return text if len(topic) <= limit else text + "..."


class TopicError(ValueError):
    """A topic or id that does not follow the grammar.  ``topic`` holds the offending text, made safe to log."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"{reason}: {loggable(topic, 120)}")
        self.topic = loggable(topic)
        self.reason = reason


class Scope(StrEnum):
    """The first level under the root: who the id in the topic names."""

    UNIT = "unit"
    DISPATCH = "dispatch"
    HOSPITAL = "hospital"
    TELEMETRY = "telemetry"


class Stream(StrEnum):
    """Every message stream of the bus."""

    AVAILABILITY = "availability"
    STATUS = "status"
    VITALS = "vitals"
    ECG = "ecg"
    GPS = "gps"
    PREALERT = "prealert"
    VIDEO = "video"
    NOTICE = "notice"
    ALERT = "alert"
    ACK = "ack"
    GAP = "gap"
    RECEIPT = "receipt"


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """How one stream travels: under which scope, at which QoS, retained or not, and its size limit."""

    stream: Stream
    scope: Scope
    qos: int
    retain: bool
    max_payload_bytes: int
    priority: int
    """Uplink priority on the vehicle, 0 first (pre-alerts) to 5 last (video); see ambulance_agent.outbox."""


STREAMS: dict[Stream, StreamSpec] = {
    spec.stream: spec
    for spec in (
        StreamSpec(Stream.PREALERT, Scope.UNIT, qos=1, retain=False, max_payload_bytes=16_384, priority=0),
        StreamSpec(Stream.AVAILABILITY, Scope.UNIT, qos=1, retain=True, max_payload_bytes=1_024, priority=1),
        StreamSpec(Stream.STATUS, Scope.UNIT, qos=1, retain=True, max_payload_bytes=4_096, priority=1),
        StreamSpec(Stream.VITALS, Scope.UNIT, qos=1, retain=False, max_payload_bytes=8_192, priority=2),
        StreamSpec(Stream.ECG, Scope.UNIT, qos=1, retain=False, max_payload_bytes=262_144, priority=3),
        StreamSpec(Stream.GPS, Scope.UNIT, qos=1, retain=True, max_payload_bytes=4_096, priority=4),
        StreamSpec(Stream.VIDEO, Scope.UNIT, qos=0, retain=False, max_payload_bytes=524_288, priority=5),
        StreamSpec(Stream.NOTICE, Scope.DISPATCH, qos=1, retain=False, max_payload_bytes=16_384, priority=0),
        StreamSpec(Stream.ALERT, Scope.HOSPITAL, qos=1, retain=False, max_payload_bytes=16_384, priority=0),
        StreamSpec(Stream.ACK, Scope.HOSPITAL, qos=1, retain=False, max_payload_bytes=4_096, priority=0),
        StreamSpec(Stream.GAP, Scope.TELEMETRY, qos=1, retain=False, max_payload_bytes=4_096, priority=1),
        StreamSpec(Stream.RECEIPT, Scope.TELEMETRY, qos=1, retain=True, max_payload_bytes=4_096, priority=1),
    )
}


def valid_id(value: str) -> str:
    """Return ``value`` if it is a valid opaque id, else raise :class:`TopicError`."""
    if not ID_PATTERN.fullmatch(value):
        raise TopicError(value, "not an opaque id [A-Za-z0-9_-]{1,32}")
    return value


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A topic taken apart: which scope, whose id, which stream."""

    scope: Scope
    owner_id: str
    stream: Stream

    @property
    def spec(self) -> StreamSpec:
        """The stream's QoS/retain policy."""
        return STREAMS[self.stream]


@dataclass(frozen=True, slots=True)
class TopicSpace:
    """Builds and parses topics under an optional prefix (empty in production, unique per test).

    Every topic string in GoldenHour comes from here; a test checks that no other module spells ``ems/``.
    """

    prefix: str = ""

    def __post_init__(self) -> None:
        if self.prefix and (not self.prefix.endswith("/") or any(c in self.prefix for c in "+#")):
            raise TopicError(self.prefix, "prefix must end with '/' and contain no wildcard")

    @property
    def root(self) -> str:
        """``{prefix}ems/v1``."""
        return f"{self.prefix}{SCHEMA_ROOT}"

    def topic(self, stream: Stream, owner_id: str) -> str:
        """The concrete topic of ``stream`` for a unit or hospital id.  Raises TopicError on a bad id."""
        spec = STREAMS[stream]
        return f"{self.root}/{spec.scope.value}/{valid_id(owner_id)}/{stream.value}"

    def unit(self, unit_id: str, stream: Stream) -> str:
        """Shorthand for a unit-scoped stream (``status``, ``vitals``, ``ecg``...)."""
        return self.topic(stream, unit_id)

    def filter(self, stream: Stream, owner_id: str = "+") -> str:
        """A subscription filter for one stream of one owner, or of all owners with ``+``."""
        spec = STREAMS[stream]
        owner = owner_id if owner_id == "+" else valid_id(owner_id)
        return f"{self.root}/{spec.scope.value}/{owner}/{stream.value}"

    def all_of_scope(self, scope: Scope) -> str:
        """``{root}/{scope}/+/+``: every stream of every owner in a scope (the ingest's subscription)."""
        return f"{self.root}/{scope.value}/+/+"

    def shared(self, group: str, topic_filter: str) -> str:
        """An MQTT 5 shared subscription filter ``$share/{group}/{filter}`` for load-balanced workers."""
        return f"$share/{valid_id(group)}/{topic_filter}"

    def parse(self, topic: str) -> ParsedTopic:
        """Take a concrete topic apart.  Raises :class:`TopicError` for anything off-grammar."""
        if not topic.startswith(self.root + "/"):
            raise TopicError(topic, "outside the topic space")
        parts = topic[len(self.root) + 1 :].split("/")
        if len(parts) != 3:
            raise TopicError(topic, "expected {scope}/{id}/{stream}")
        scope_s, owner, stream_s = parts
        try:
            scope = Scope(scope_s)
            stream = Stream(stream_s)
        except ValueError:
            raise TopicError(topic, "unknown scope or stream") from None
        if STREAMS[stream].scope is not scope:
            raise TopicError(topic, "stream not allowed in this scope")
        if not ID_PATTERN.fullmatch(owner):
            raise TopicError(topic, "not an opaque id")
        return ParsedTopic(scope, owner, stream)

    @staticmethod
    def matches(topic_filter: str, topic: str) -> bool:
        """MQTT wildcard matching, by the MQTT library's own matcher (no regexes of ours)."""
        return bool(_paho.topic_matches_sub(topic_filter, topic))
