"""Per-unit AES-GCM sealing of payloads at rest (ambulance_agent.crypto)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from ambulance_agent.crypto import MAGIC, CryptoError, UnitCipher, generate_unit_key, load_unit_key


def test_seal_and_open_round_trip_without_plaintext_in_the_blob() -> None:
    cipher = UnitCipher("AMB1", generate_unit_key())
    payload = b'{"heart_rate_bpm": 143, "note": "Jane Doe"}'
    blob = cipher.seal(payload, context=b"vitals:17")
    assert blob.startswith(MAGIC)
    assert b"Jane" not in blob
    assert b"143" not in blob
    assert cipher.open(blob, context=b"vitals:17") == payload
    assert cipher.seal(payload) != cipher.seal(payload), "a fresh nonce each time"


def test_tampered_moved_or_foreign_blobs_do_not_open() -> None:
    key = generate_unit_key()
    cipher = UnitCipher("AMB1", key)
    blob = cipher.seal(b"ecg", context=b"ecg:5")
    flipped = blob[:-1] + bytes([blob[-1] ^ 1])
    for bad, context in ((flipped, b"ecg:5"), (blob, b"ecg:6"), (blob[:10], b"ecg:5"), (b"plain", b"")):
        with pytest.raises(CryptoError):
            cipher.open(bad, context=context)
    with pytest.raises(CryptoError):
        UnitCipher("AMB2", key).open(blob, context=b"ecg:5")  # same key on another unit's disk
    with pytest.raises(CryptoError, match="key"):
        UnitCipher("AMB1", generate_unit_key()).open(blob, context=b"ecg:5")


def test_rotation_seals_with_the_new_key_and_opens_old_blobs() -> None:
    old, new = generate_unit_key(), generate_unit_key()
    before = UnitCipher("AMB1", old).seal(b"x")
    rotated = UnitCipher("AMB1", new, previous_keys=[old])
    assert rotated.open(before) == b"x"
    assert UnitCipher("AMB1", new).open(rotated.seal(b"y")) == b"y"


def test_key_files_must_be_private_and_256_bit(tmp_path: Path) -> None:
    key = generate_unit_key()
    path = tmp_path / "amb1.key"
    path.write_bytes(base64.b64encode(key))
    path.chmod(0o644)
    with pytest.raises(CryptoError, match="owner only"):
        load_unit_key(path)
    path.chmod(0o600)
    assert load_unit_key(path) == key
    path.write_bytes(b"short")
    with pytest.raises(CryptoError):
        load_unit_key(path)
    with pytest.raises(CryptoError):
        UnitCipher("AMB1", b"k" * 16)
