"""Input hardening: arbitrary bytes into the codec, generated requests into dispatch's whole OpenAPI surface.

* Hypothesis: the JSON and ECG decoders of :mod:`broker_config.codec` refuse any byte string with
  :class:`PayloadError` and nothing else (a consumer's error boundary counts exactly that one class).
* Schemathesis: every operation of dispatch's OpenAPI document, positive (schema-valid) and negative
  (schema-violating) requests, in process against the ASGI app, as an administrator and without a token; no answer
  may be a server error (5xx).  Bounded examples per operation and mode keep the whole run well under a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from broker_config import STREAMS, BrokerSettings, EcgChunk, PayloadError, Stream, TopicSpace, decode, decode_ecg
from broker_config.codec import MODELS
from broker_config.connection import NotConnectedError
from broker_config.identity import Role
from dispatch.api import create_app
from dispatch.hospitals import DATA_DIR, HospitalRegistry
from dispatch.routing import RoadRouter
from dispatch.security import DispatchSecurity
from dispatch.service import DispatchService

SPACE = TopicSpace("fuzz/")
DECODABLE = sorted(s for s in MODELS if s is not Stream.ECG)

# --- the codec ------------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, derandomize=True)
@given(stream=st.sampled_from(DECODABLE), payload=st.binary(max_size=20_000))
def test_json_decoders_refuse_arbitrary_bytes_with_payload_error_only(stream: Stream, payload: bytes) -> None:
    topic = SPACE.topic(stream, "U1" if STREAMS[stream].scope.value == "unit" else "H1")
    with contextlib.suppress(PayloadError):
        decode(SPACE, topic, payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner, max_size=8),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(stream=st.sampled_from(DECODABLE), doc=st.dictionaries(st.text(max_size=20), json_values, max_size=12))
def test_json_decoders_refuse_arbitrary_json_objects_with_payload_error_only(
    stream: Stream, doc: dict[str, object]
) -> None:
    """Deeper than random bytes: well-formed JSON objects with the envelope's keys in random shapes."""
    topic = SPACE.topic(stream, "U1" if STREAMS[stream].scope.value == "unit" else "H1")
    doc = {"schema_version": 1, "unit_id": "U1", "seq": 0, "sent_at": "2025-01-01T00:00:00Z", **doc}
    with contextlib.suppress(PayloadError):
        decode(SPACE, topic, json.dumps(doc, allow_nan=True).encode())


@settings(max_examples=400, deadline=None, derandomize=True)
@given(payload=st.binary(max_size=4_000))
def test_ecg_decoder_refuses_arbitrary_bytes_with_payload_error_only(payload: bytes) -> None:
    for candidate in (payload, b"GHE1" + payload):
        with contextlib.suppress(PayloadError):
            decode_ecg(candidate)
        with contextlib.suppress(PayloadError):
            decode(SPACE, SPACE.topic(Stream.ECG, "U1"), candidate)


_HEAD = struct.Struct("<4sBBBBQqqddiIH")


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    version=st.integers(0, 255),
    flags=st.integers(0, 255),
    n_leads=st.integers(0, 255),
    unit_len=st.integers(0, 255),
    seq=st.integers(0, 2**64 - 1),
    sent_us=st.integers(-(2**63), 2**63 - 1),
    start_us=st.integers(-(2**63), 2**63 - 1),
    fs=st.floats(allow_nan=True, allow_infinity=True),
    gain=st.floats(allow_nan=True, allow_infinity=True),
    baseline=st.integers(-(2**31), 2**31 - 1),
    n_samples=st.integers(0, 2**32 - 1),
    lead_off=st.integers(0, 2**16 - 1),
    tail=st.binary(max_size=2_000),
)
def test_ecg_decoder_refuses_structured_garbage_with_payload_error_only(
    version: int,
    flags: int,
    n_leads: int,
    unit_len: int,
    seq: int,
    sent_us: int,
    start_us: int,
    fs: float,
    gain: float,
    baseline: int,
    n_samples: int,
    lead_off: int,
    tail: bytes,
) -> None:
    """A header that parses, with every field at random: the decoder gets past the magic and the layout."""
    head = _HEAD.pack(
        b"GHE1", version, flags, n_leads, unit_len, seq, sent_us, start_us, fs, gain, baseline, n_samples, lead_off
    )
    try:
        chunk = decode_ecg(head + b"U1" + tail)
    except PayloadError:
        return
    assert isinstance(chunk, EcgChunk)


# --- dispatch's OpenAPI surface --------------------------------------------------------------------------------------


class _NoBroker:
    """The MQTT link of a service without a broker: every publish fails at once (no waiting)."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.sessions = 0

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False, timeout_s: float) -> None:
        raise NotConnectedError("no broker in this test")

    async def wait_connected(self, timeout_s: float) -> None:
        raise TimeoutError


_ROUTER = RoadRouter.from_pbf(DATA_DIR / "monaco.osm.pbf")
_SERVICE = DispatchService(BrokerSettings(), TopicSpace("st/"), HospitalRegistry.load(), _ROUTER)
_SERVICE.link = _NoBroker()  # type: ignore[assignment]
_SECURITY = DispatchSecurity.development(access_ttl_s=3_600)
_APP = create_app(service=_SERVICE, security=_SECURITY)
_ADMIN = {"Authorization": f"Bearer {_SECURITY.issue('fuzz-admin', Role.ADMINISTRATOR)}"}
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", _APP)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]  # type: ignore[union-attr]  # an Err raises
_EXAMPLES = 12
_OPEN_PATHS = frozenset(
    {"/api/health", "/api/auth/login", "/api/auth/refresh", "/api/auth/logout", "/console", "/console/{name}", "/login"}
)


CASES = [
    pytest.param(op, mode, id=f"{op.method.upper()} {op.path} {mode.value}")
    for op in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or op.body or any(True for _ in op.iter_parameters())
]
"""Negative mode needs something to break: operations without parameters or body run positive only."""


@pytest.mark.parametrize(("operation", "mode"), CASES)
def test_dispatch_api_never_answers_a_server_error(operation: schemathesis.APIOperation, mode: GenerationMode) -> None:
    @settings(
        max_examples=_EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=operation.as_strategy(generation_mode=mode), signed_in=st.booleans())
    def run(case: schemathesis.Case, signed_in: bool) -> None:
        response = case.call(headers=_ADMIN if signed_in else None)
        assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}"
        if not signed_in and operation.path not in _OPEN_PATHS:
            assert not 200 <= response.status_code < 300, (
                f"{case.method} {case.formatted_path} answered without a token"
            )

    try:
        run()
    except Unsatisfiable:
        # negative mode cannot violate an unconstrained path string (every string is valid there)
        assert mode is GenerationMode.NEGATIVE
