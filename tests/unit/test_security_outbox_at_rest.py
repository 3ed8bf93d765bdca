"""The vehicle's outbox at rest: sealed with the unit's AES-256-GCM key, rotation, tampering, wrong key, settings."""

from __future__ import annotations

import base64
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from ambulance_agent.crypto import UnitCipher, generate_unit_key
from ambulance_agent.main import build
from ambulance_agent.outbox import Outbox, OutboxError
from ambulance_agent.settings import AgentSettings
from broker_config import Stream, TopicSpace

SPACE = TopicSpace()
UNIT = "amb12"
VITALS = b'{"unit_id":"amb12","heart_rate_bpm":137,"spo2_pct":91.5,"note":"chest pain since 04:10"}'
SECRETS = (b'"heart_rate_bpm":137', b"91.5", b"chest pain")


def put_vitals(box: Outbox, n: int = 20) -> None:
    for _ in range(n):
        box.put(Stream.VITALS, SPACE.topic(Stream.VITALS, UNIT), lambda seq: VITALS)


def raw_bytes(path: Path) -> bytes:
    """Every byte SQLite keeps for the outbox: the database, its WAL and shared-memory index."""
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def test_the_outbox_file_and_wal_hold_no_plaintext(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    cipher = UnitCipher(UNIT, generate_unit_key())
    box = Outbox(path, cipher=cipher)
    put_vitals(box)
    assert (path.parent / "o.db-wal").stat().st_size > 0, "the rows are still in the WAL: it is checked too"
    on_disk = raw_bytes(path)
    for secret in SECRETS:
        assert secret not in on_disk
    assert [m.payload for m in box.pending(100)] == [VITALS] * 20
    box.close()
    on_disk = raw_bytes(path)
    for secret in SECRETS:
        assert secret not in on_disk
    again = Outbox(path, cipher=cipher)
    assert [m.payload for m in again.pending(5)] == [VITALS] * 5
    again.close()


def test_a_clear_outbox_is_sealed_on_the_first_start_with_a_key(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    clear = Outbox(path)
    put_vitals(clear)
    clear.close()
    assert SECRETS[0] in raw_bytes(path)
    cipher = UnitCipher(UNIT, generate_unit_key())
    box = Outbox(path, cipher=cipher)
    assert [m.payload for m in box.pending(100)] == [VITALS] * 20
    box.close()
    on_disk = raw_bytes(path)
    for secret in SECRETS:
        assert secret not in on_disk, "secure_delete and the WAL truncation leave no clear copy behind"


def test_rotation_old_rows_open_and_are_resealed_with_the_new_key(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    old, new = generate_unit_key(), generate_unit_key()
    box = Outbox(path, cipher=UnitCipher(UNIT, old))
    put_vitals(box, 3)
    box.close()
    rotated = Outbox(path, cipher=UnitCipher(UNIT, new, previous_keys=[old]))
    s0 = rotated.first_seq
    assert [(m.seq - s0, m.payload) for m in rotated.pending(10)] == [(0, VITALS), (1, VITALS), (2, VITALS)]
    put_vitals(rotated, 1)
    rotated.close()
    retired = Outbox(path, cipher=UnitCipher(UNIT, new))  # the old key can go once every row was re-sealed
    assert [m.seq - s0 for m in retired.pending(10)] == [0, 1, 2, 3]
    retired.close()


def test_a_wrong_or_missing_key_stops_the_start_and_deletes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    key = generate_unit_key()
    box = Outbox(path, cipher=UnitCipher(UNIT, key))
    put_vitals(box, 4)
    box.close()
    with pytest.raises(OutboxError, match="key this unit does not hold"):
        Outbox(path, cipher=UnitCipher(UNIT, generate_unit_key()))
    with pytest.raises(OutboxError, match="unit key is required"):
        Outbox(path)
    again = Outbox(path, cipher=UnitCipher(UNIT, key))
    assert len(again.pending(10)) == 4
    assert again.stats().rejected == 0
    again.close()


def test_tampered_and_swapped_rows_are_rejected_counted_and_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path, cipher=UnitCipher(UNIT, generate_unit_key()))
    put_vitals(box, 5)
    ids = [m.id for m in box.pending(10)]
    db = sqlite3.connect(path, isolation_level=None)
    (blob,) = db.execute("SELECT payload FROM messages WHERE id = ?", (ids[0],)).fetchone()
    db.execute("UPDATE messages SET payload = ? WHERE id = ?", (blob[:-1] + bytes([blob[-1] ^ 1]), ids[0]))
    a, b = (db.execute("SELECT payload FROM messages WHERE id = ?", (i,)).fetchone()[0] for i in ids[1:3])
    db.execute("UPDATE messages SET payload = ? WHERE id = ?", (b, ids[1]))
    db.execute("UPDATE messages SET payload = ? WHERE id = ?", (a, ids[2]))
    db.close()
    good = box.pending(10)
    assert [m.id for m in good] == ids[3:]
    assert all(m.payload == VITALS for m in good)
    stats = box.stats()
    assert (stats.rejected, stats.count, stats.size_bytes) == (3, 2, 2 * len(VITALS))
    assert box.pending(10) == good, "a rejected row is not offered again"
    db = sqlite3.connect(path)
    assert sorted(r[0] for r in db.execute("SELECT id FROM quarantine")) == ids[:3]
    db.close()
    box.close()


def test_another_units_outbox_does_not_open(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    key = generate_unit_key()
    box = Outbox(path, cipher=UnitCipher(UNIT, key))
    put_vitals(box, 2)
    box.close()
    other = Outbox(path, cipher=UnitCipher("amb13", key))  # the same key bytes on another unit: still refused
    assert other.pending(10) == []
    assert other.stats().rejected == 2
    other.close()


# --- settings ------------------------------------------------------------------------------------------------------


def key_file(path: Path, mode: int = 0o600) -> Path:
    path.write_bytes(base64.b64encode(generate_unit_key()))
    path.chmod(mode)
    return path


def test_production_refuses_to_start_without_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMS_SECURITY_MODE", raising=False)
    with pytest.raises(ValidationError, match="unit key is required"):
        AgentSettings(unit_id="amb-1", outbox_path=tmp_path / "o.db")
    with pytest.raises(ValidationError, match="owner only"):
        AgentSettings(unit_id="amb-1", unit_key_file=key_file(tmp_path / "k", 0o644))
    with pytest.raises(ValidationError, match="cannot be read"):
        AgentSettings(unit_id="amb-1", unit_key_file=tmp_path / "missing")
    with pytest.raises(ValidationError, match="32 bytes"):
        AgentSettings(unit_id="amb-1", unit_key="c2hvcnQ=")


def test_the_agent_built_from_settings_seals_its_outbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMS_SECURITY_MODE", raising=False)
    monkeypatch.setenv("EMS_AGENT_UNIT_KEY_FILE", str(key_file(tmp_path / "unit.key")))
    settings = AgentSettings(unit_id="amb-1", outbox_path=tmp_path / "box" / "o.db")  # type: ignore[call-arg]
    built = build(settings)
    try:
        built.agent.outbox.put(Stream.VITALS, SPACE.topic(Stream.VITALS, "amb-1"), lambda seq: VITALS)
        assert SECRETS[0] not in raw_bytes(tmp_path / "box" / "o.db")
        assert built.agent.outbox.pending(1)[0].payload == VITALS
    finally:
        built.agent.close()
    raw = base64.b64encode(generate_unit_key()).decode()
    assert AgentSettings(unit_id="amb-1", unit_key=raw, unit_key_file=None).cipher().unit_id == "amb-1"


def test_development_generates_an_owner_only_key_beside_the_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMS_SECURITY_MODE", "development")
    settings = AgentSettings(unit_id="amb-1", outbox_path=tmp_path / "state" / "o.db")  # type: ignore[call-arg]
    first = settings.cipher()
    key = tmp_path / "state" / "unit.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    blob = first.seal(b"x")
    assert settings.cipher().open(blob) == b"x", "the generated key is reused at the next start"


# --- what a sealed outbox accepts at rest ----------------------------------------------------------------------------

INJECTED = b'{"injected":"by attacker"}'


def sealed_outbox(path: Path, cipher: UnitCipher, n: int = 3) -> list[int]:
    box = Outbox(path, cipher=cipher)
    put_vitals(box, n)
    ids = [m.id for m in box.pending(n)]
    box.close()
    return ids


def quarantined(path: Path) -> dict[int, str]:
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT id, reason FROM quarantine").fetchall())
    finally:
        db.close()


def test_a_clear_row_in_a_sealed_outbox_is_quarantined_never_sent(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    cipher = UnitCipher(UNIT, generate_unit_key())
    ids = sealed_outbox(path, cipher)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("UPDATE messages SET payload = ? WHERE id = ?", (INJECTED, ids[0]))
    db.close()
    box = Outbox(path, cipher=cipher)  # at start: not taken for a row of an older unencrypted outbox
    got = box.pending(10)
    assert [m.id for m in got] == ids[1:]
    assert INJECTED not in [m.payload for m in got]
    assert box.stats().rejected == 1
    assert quarantined(path) == {ids[0]: "not a sealed payload in a sealed outbox"}
    db = sqlite3.connect(path, isolation_level=None)  # and while running: refused by pending()
    db.execute("UPDATE messages SET payload = ? WHERE id = ?", (INJECTED, ids[1]))
    db.close()
    assert [m.id for m in box.pending(10)] == ids[2:]
    assert box.stats().rejected == 2
    box.close()
    with pytest.raises(OutboxError, match="unit key is required"):
        Outbox(path)  # the marker alone says it is sealed, even without a sealed row left


def test_an_unencrypted_outbox_is_migrated_once_only(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    clear = Outbox(path)
    put_vitals(clear, 2)
    clear.close()
    cipher = UnitCipher(UNIT, generate_unit_key())
    box = Outbox(path, cipher=cipher)
    assert [m.payload for m in box.pending(10)] == [VITALS] * 2
    box.close()
    db = sqlite3.connect(path, isolation_level=None)
    assert db.execute("SELECT value FROM meta WHERE name = 'sealed'").fetchone() == ("2",)
    db.execute(
        "INSERT INTO messages (stream, seq, priority, topic, payload, qos, retain, created_at_s, size_bytes)"
        " VALUES ('prealert', 1, 0, ?, ?, 1, 0, 0, ?)",
        (SPACE.topic(Stream.PREALERT, UNIT), INJECTED, len(INJECTED)),
    )
    db.close()
    again = Outbox(path, cipher=cipher)
    assert [m.payload for m in again.pending(10)] == [VITALS] * 2
    assert again.stats().rejected == 1
    again.close()


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("topic", "ems/v1/unit/amb13/prealert"),
        ("qos", 0),
        ("retain", 1),
        ("created_at_s", 1.0),
        ("priority", 9),
        ("size_bytes", 1),
    ],
)
def test_every_column_the_sender_uses_is_bound_to_the_seal(tmp_path: Path, column: str, value: object) -> None:
    path = tmp_path / "o.db"
    cipher = UnitCipher(UNIT, generate_unit_key())
    ids = sealed_outbox(path, cipher)
    box = Outbox(path, cipher=cipher)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"UPDATE messages SET {column} = ? WHERE id = ?", (value, ids[1]))
    db.close()
    assert [m.id for m in box.pending(10)] == [ids[0], ids[2]]
    assert box.stats().rejected == 1
    box.close()


def test_rows_sealed_in_the_first_format_are_opened_and_resealed(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    cipher = UnitCipher(UNIT, generate_unit_key())
    ids = sealed_outbox(path, cipher, 2)
    db = sqlite3.connect(path, isolation_level=None)  # as the outbox wrote it before the marker: stream|seq only
    for message_id, stream, seq in db.execute("SELECT id, stream, seq FROM messages").fetchall():
        old = cipher.seal(VITALS, context=f"outbox|{stream}|{seq}".encode())
        db.execute("UPDATE messages SET payload = ? WHERE id = ?", (old, message_id))
    db.execute("DELETE FROM meta")
    db.close()
    box = Outbox(path, cipher=cipher)
    assert [(m.id, m.payload) for m in box.pending(10)] == [(i, VITALS) for i in ids]
    box.close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("UPDATE messages SET topic = 'x' WHERE id = ?", (ids[0],))  # now bound to the topic
    db.close()
    again = Outbox(path, cipher=cipher)
    assert [m.id for m in again.pending(10)] == ids[1:]
    again.close()


def flip_key_id(path: Path, message_ids: list[int]) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    for message_id in message_ids:
        (blob,) = db.execute("SELECT payload FROM messages WHERE id = ?", (message_id,)).fetchone()
        blob = bytearray(blob)
        blob[5] ^= 1  # inside the key id (bytes 4..11)
        db.execute("UPDATE messages SET payload = ? WHERE id = ?", (bytes(blob), message_id))
    db.close()


def test_one_row_of_an_unknown_key_is_quarantined_and_the_agent_starts(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    cipher = UnitCipher(UNIT, generate_unit_key())
    ids = sealed_outbox(path, cipher, 4)
    flip_key_id(path, [ids[-1]])
    box = Outbox(path, cipher=cipher)
    assert [m.id for m in box.pending(10)] == ids[:-1]
    assert box.stats().rejected == 1
    assert quarantined(path) == {ids[-1]: "sealed with a key this unit does not hold"}
    box.close()


def test_when_no_row_opens_the_start_stops_and_deletes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    cipher = UnitCipher(UNIT, generate_unit_key())
    ids = sealed_outbox(path, cipher, 3)
    flip_key_id(path, ids)  # every row of an unknown key: the wrong key is configured
    with pytest.raises(OutboxError, match="none opens with the configured keys"):
        Outbox(path, cipher=cipher)
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM messages").fetchone() == (3,)
    assert db.execute("SELECT count(*) FROM quarantine").fetchone() == (0,)
    db.close()
