"""The shared token format (broker_config.identity) and the settings that refuse unsafe security values."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest

from broker_config.identity import (
    Claims,
    Role,
    SecurityMode,
    TokenError,
    generate_signing_key,
    issue_token,
    key_id,
    load_signing_key,
    load_verify_key,
    signing_key_text,
    verify_key_text,
    verify_token,
)
from dispatch.settings import DispatchSettings
from hospital_board.settings import BoardSettings

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
KEY = generate_signing_key()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_round_trip_carries_role_and_binding() -> None:
    token, claims = issue_token(KEY, subject="nurse.a", role=Role.ED_STAFF, hospital_id="H1", ttl_s=900, now=NOW)
    got = verify_token(token, KEY.public_key(), now=NOW + timedelta(minutes=5))
    assert got == claims
    assert (got.sub, got.role, got.hospital_id, got.unit_id) == ("nurse.a", Role.ED_STAFF, "H1", None)
    assert got.expires_at == NOW + timedelta(minutes=15)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "EdDSA", "typ": "JWT", "kid": key_id(KEY)}


def test_expired_and_not_yet_valid_tokens_are_refused() -> None:
    token, _ = issue_token(KEY, subject="d", role=Role.DISPATCHER, ttl_s=900, now=NOW)
    with pytest.raises(TokenError) as expired:
        verify_token(token, KEY.public_key(), now=NOW + timedelta(minutes=16))
    assert expired.value.reason == "expired"
    verify_token(token, KEY.public_key(), now=NOW + timedelta(seconds=929))  # within the 30 s leeway
    with pytest.raises(TokenError) as early:
        verify_token(token, KEY.public_key(), now=NOW - timedelta(minutes=5))
    assert early.value.reason == "not_yet_valid"


def test_tampered_forged_and_foreign_tokens_are_refused() -> None:
    token, _ = issue_token(KEY, subject="c", role=Role.CREW, unit_id="AMB1", ttl_s=900, now=NOW)
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["role"] = "administrator"
    claims.pop("unit_id")
    escalated = f"{head}.{_b64(json.dumps(claims).encode())}.{sig}"
    with pytest.raises(TokenError, match="bad_signature"):
        verify_token(escalated, KEY.public_key(), now=NOW)
    none_alg = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": key_id(KEY)}).encode())
    with pytest.raises(TokenError, match="bad_header"):
        verify_token(f"{none_alg}.{body}.", KEY.public_key(), now=NOW)
    hs = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key_id(KEY)}).encode())
    with pytest.raises(TokenError, match="bad_header"):
        verify_token(f"{hs}.{body}.{sig}", KEY.public_key(), now=NOW)
    other = generate_signing_key()
    foreign, _ = issue_token(other, subject="c", role=Role.CREW, unit_id="AMB1", ttl_s=900, now=NOW)
    with pytest.raises(TokenError, match="unknown_key"):
        verify_token(foreign, KEY.public_key(), now=NOW)
    assert verify_token(foreign, [KEY.public_key(), other.public_key()], now=NOW).unit_id == "AMB1"  # rotation
    for junk in ("", "a.b", "a.b.c.d", "x" * 5000, "é.é.é", f"{head}.!!.{sig}"):
        with pytest.raises(TokenError):
            verify_token(junk, KEY.public_key(), now=NOW)


def test_wrong_issuer_or_audience_is_refused() -> None:
    token, _ = issue_token(KEY, subject="d", role=Role.DISPATCHER, ttl_s=60, now=NOW, audience="elsewhere")
    with pytest.raises(TokenError, match="wrong_audience"):
        verify_token(token, KEY.public_key(), now=NOW)
    token, _ = issue_token(KEY, subject="d", role=Role.DISPATCHER, ttl_s=60, now=NOW, issuer="mallory")
    with pytest.raises(TokenError, match="wrong_issuer"):
        verify_token(token, KEY.public_key(), now=NOW)


@pytest.mark.parametrize(
    ("role", "hospital_id", "unit_id"),
    [
        (Role.ED_STAFF, None, None),
        (Role.DEPARTMENT_ONCALL, None, None),
        (Role.CREW, None, None),
        (Role.DISPATCHER, "H1", None),
        (Role.ED_STAFF, "H1", "AMB1"),
        (Role.QUALITY_MANAGER, None, "AMB1"),
    ],
)
def test_bindings_that_do_not_fit_the_role_are_refused(
    role: Role, hospital_id: str | None, unit_id: str | None
) -> None:
    with pytest.raises(ValueError):
        issue_token(KEY, subject="x", role=role, hospital_id=hospital_id, unit_id=unit_id, ttl_s=60, now=NOW)


def _claims(role: Role, hospital_id: str | None = None, unit_id: str | None = None) -> Claims:
    return issue_token(KEY, subject="x", role=role, hospital_id=hospital_id, unit_id=unit_id, ttl_s=60, now=NOW)[1]


def test_scoping_rules() -> None:
    ed = _claims(Role.ED_STAFF, "H1")
    assert ed.may_see_hospital("H1")
    assert not ed.may_see_hospital("H2")
    assert ed.may_see_unit("AMB1", ["H1"])
    assert not ed.may_see_unit("AMB1", ["H2", None])
    crew = _claims(Role.CREW, unit_id="AMB1")
    assert crew.may_see_unit("AMB1", ["H9"])
    assert not crew.may_see_unit("AMB2", ["H1"])
    assert not crew.may_see_hospital("H1")
    for regional in (Role.DISPATCHER, Role.QUALITY_MANAGER, Role.ADMINISTRATOR):
        c = _claims(regional)
        assert c.may_see_hospital("H7")
        assert c.may_see_unit("AMB9", [])
    board = _claims(Role.SERVICE, "H1")
    assert board.hospital_scoped
    assert not board.may_see_hospital("H2")
    assert not board.is_person


def test_key_texts_round_trip_and_bad_keys_are_refused() -> None:
    assert signing_key_text(load_signing_key(signing_key_text(KEY))) == signing_key_text(KEY)
    assert key_id(load_verify_key(verify_key_text(KEY))) == key_id(KEY)
    for bad in ("", "short", _b64(b"\x00" * 32), _b64(b"x" * 31), _b64(bytes(range(33))), "-----BEGIN nonsense"):
        with pytest.raises(ValueError):
            load_signing_key(bad)
    with pytest.raises(ValueError):
        load_verify_key(_b64(b"k" * 16))


def test_dispatch_settings_refuse_unsafe_values() -> None:
    with pytest.raises(ValueError, match="SIGNING_KEY is required"):
        DispatchSettings()
    with pytest.raises(ValueError):
        DispatchSettings(signing_key="too-short")
    with pytest.raises(ValueError, match="loopback"):
        DispatchSettings(security_mode=SecurityMode.DEVELOPMENT, http_host="0.0.0.0")
    with pytest.raises(ValueError):
        DispatchSettings(signing_key=signing_key_text(KEY), access_token_ttl_s=4 * 3600)
    ok = DispatchSettings(signing_key=signing_key_text(KEY), http_host="10.0.0.5")
    assert ok.security_mode is SecurityMode.PRODUCTION
    assert signing_key_text(KEY) not in repr(ok), "the key never shows in a repr or a log line"
    assert DispatchSettings(security_mode=SecurityMode.DEVELOPMENT).signing_key is None


def test_dispatch_settings_read_the_shared_mode_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMS_SECURITY_MODE", "development")
    assert DispatchSettings().security_mode is SecurityMode.DEVELOPMENT
    monkeypatch.setenv("EMS_SECURITY_MODE", "insecure")
    with pytest.raises(ValueError):
        DispatchSettings()


def test_board_settings_refuse_unsafe_values() -> None:
    public = verify_key_text(KEY)
    with pytest.raises(ValueError, match="VERIFY_KEYS is required"):
        BoardSettings()
    with pytest.raises(ValueError, match="dispatch_url"):
        BoardSettings(verify_keys=(public,))
    with pytest.raises(ValueError, match="at least 32"):
        BoardSettings(verify_keys=(public,), dispatch_url="http://d:8081", dispatch_client_id="board",
                      dispatch_client_secret="short")  # fmt: skip
    with pytest.raises(ValueError, match="loopback"):
        BoardSettings(security_mode=SecurityMode.DEVELOPMENT, http_host="192.168.1.10")
    with pytest.raises(ValueError):
        BoardSettings(security_mode=SecurityMode.DEVELOPMENT, verify_keys=("not-a-key",))
    ok = BoardSettings(
        verify_keys=(public,),
        dispatch_url="http://d:8081",
        dispatch_client_id="board",
        dispatch_client_secret="s" * 8 + "x" * 30,
    )
    assert ok.security_mode is SecurityMode.PRODUCTION
