"""GoldenHour's message contract: topics, QoS/retain policy, payload models and their codec.

Every producer and consumer imports the contract from here; nothing else spells a topic or encodes a payload.
"""

from broker_config.codec import MODELS, PayloadError, decode, decode_as, decode_ecg, ecg_to_mv, encode, encode_ecg
from broker_config.codes import VITAL_CODES, VitalCode, code_for_field
from broker_config.payloads import (
    SCHEMA_VERSION,
    AlertAck,
    AlertState,
    Availability,
    CaseType,
    CrewStatus,
    Department,
    EcgChunk,
    Envelope,
    Findings,
    GapRecord,
    GpsFix,
    HospitalAlert,
    Notice,
    NoticeKind,
    PreAlert,
    Priority,
    Status,
    Vitals,
    utc_now,
)
from broker_config.settings import BrokerSettings
from broker_config.topics import STREAMS, ParsedTopic, Scope, Stream, StreamSpec, TopicError, TopicSpace, valid_id

__all__ = [
    "MODELS",
    "SCHEMA_VERSION",
    "STREAMS",
    "VITAL_CODES",
    "AlertAck",
    "AlertState",
    "Availability",
    "BrokerSettings",
    "CaseType",
    "CrewStatus",
    "Department",
    "EcgChunk",
    "Envelope",
    "Findings",
    "GapRecord",
    "GpsFix",
    "HospitalAlert",
    "Notice",
    "NoticeKind",
    "ParsedTopic",
    "PayloadError",
    "PreAlert",
    "Priority",
    "Scope",
    "Status",
    "Stream",
    "StreamSpec",
    "TopicError",
    "TopicSpace",
    "VitalCode",
    "Vitals",
    "code_for_field",
    "decode",
    "decode_as",
    "decode_ecg",
    "ecg_to_mv",
    "encode",
    "encode_ecg",
    "utc_now",
    "valid_id",
]
