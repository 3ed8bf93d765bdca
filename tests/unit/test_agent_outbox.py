"""The durable outbox: priority order, byte bound with ECG shed first, counters and messages across reopen."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambulance_agent.outbox import Outbox, OutboxError, OutboxFullError, seq_seed
from broker_config import STREAMS, Stream, TopicSpace

SPACE = TopicSpace()
UNIT = "amb12"


def put(box: Outbox, stream: Stream, size: int = 10) -> int:
    return box.put(stream, SPACE.topic(stream, UNIT), lambda seq: bytes([seq % 256]) * size)


def test_order_is_priority_then_insertion(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    for stream in (Stream.GPS, Stream.ECG, Stream.VITALS, Stream.ECG, Stream.STATUS, Stream.PREALERT, Stream.GPS):
        put(box, stream)
    got = [(m.stream, m.seq - box.first_seq) for m in box.pending(100)]
    assert got == [
        (Stream.PREALERT, 0),
        (Stream.STATUS, 0),
        (Stream.VITALS, 0),
        (Stream.ECG, 0),
        (Stream.ECG, 1),
        (Stream.GPS, 0),
        (Stream.GPS, 1),
    ]
    assert [STREAMS[s].priority for s, _ in got] == sorted(STREAMS[s].priority for s, _ in got)
    first_two = box.pending(2)
    assert [m.stream for m in box.pending(2, exclude_ids=[m.id for m in first_two])] == [Stream.VITALS, Stream.ECG]
    msg = first_two[0]
    assert (msg.qos, msg.retain, msg.topic) == (1, False, SPACE.topic(Stream.PREALERT, UNIT))
    assert box.pending(1)[0].created_at_s > 0


def test_ack_deletes_once_and_stats_follow(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", wall_clock_s=iter(range(999, 2000)).__next__)  # 999: the counters' seed
    ids = []
    for _ in range(3):
        put(box, Stream.ECG, size=100)
    ids = [m.id for m in box.pending(10)]
    stats = box.stats()
    assert (stats.count, stats.size_bytes, stats.oldest_created_at_s) == (3, 300, 1000.0)
    assert box.ack(ids[0]) is True
    assert box.ack(ids[0]) is False  # acknowledged twice (a duplicate PUBACK after a re-send)
    stats = box.stats()
    assert (stats.count, stats.size_bytes, stats.oldest_created_at_s) == (2, 200, 1001.0)
    for i in ids[1:]:
        box.ack(i)
    assert box.stats().oldest_created_at_s is None
    assert box.pending(10) == []


def test_full_outbox_sheds_oldest_ecg_first_never_alerts_status_or_vitals(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=1000)
    put(box, Stream.PREALERT, 100)
    put(box, Stream.STATUS, 100)
    put(box, Stream.VITALS, 100)
    for _ in range(5):
        put(box, Stream.ECG, 100)
    put(box, Stream.GPS, 100)  # 900 bytes now
    put(box, Stream.ECG, 100)  # 1000: fits exactly
    put(box, Stream.VITALS, 150)  # needs 150 more: the two oldest ECG chunks go
    remaining = [(m.stream, m.seq - box.first_seq) for m in box.pending(100)]
    assert (Stream.ECG, 0) not in remaining
    assert (Stream.ECG, 1) not in remaining
    assert [s for s in remaining if s[0] is Stream.ECG] == [(Stream.ECG, i) for i in range(2, 6)]
    assert box.stats().shed == {"ecg": 2}
    assert box.stats().size_bytes <= 1000
    # fill with protected messages until no ECG is left: then GPS goes, then the bound is exceeded, never shed
    for _ in range(10):
        put(box, Stream.PREALERT, 100)
    streams = [m.stream for m in box.pending(100)]
    assert Stream.ECG not in streams
    assert Stream.GPS not in streams
    assert streams.count(Stream.PREALERT) == 11
    assert streams.count(Stream.VITALS) == 2
    assert streams.count(Stream.STATUS) == 1
    # a new ECG chunk that cannot fit is itself shed; its seq is consumed (the store reports the gap)
    assert put(box, Stream.ECG, 100) == -1
    assert box.peek_seq(Stream.ECG) == box.first_seq + 7


def test_counters_and_backlog_survive_reopen_and_seq_is_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "agent" / "outbox.db"
    box = Outbox(path)
    s0 = box.first_seq
    assert [box.next_session() for _ in range(3)] == [s0, s0 + 1, s0 + 2]
    for _ in range(4):
        put(box, Stream.ECG)
    put(box, Stream.VITALS)
    for m in box.pending(2):
        box.ack(m.id)  # vitals 0 and ECG 0 delivered
    box.close()
    box.close()  # idempotent

    again = Outbox(path)
    assert again.first_seq == s0, "a persisted outbox keeps its counters (and seed)"
    assert again.next_session() == s0 + 3
    assert [(m.stream, m.seq - s0) for m in again.pending(10)] == [(Stream.ECG, 1), (Stream.ECG, 2), (Stream.ECG, 3)]
    assert again.stats().count == 3
    assert put(again, Stream.ECG) == s0 + 4
    assert put(again, Stream.VITALS) == s0 + 1
    assert again.peek_seq(Stream.GPS) == s0
    # the file is in WAL mode
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_failed_encoding_consumes_no_seq(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")

    def boom(seq: int) -> bytes:
        raise ValueError("cannot encode")

    with pytest.raises(ValueError):
        box.put(Stream.VITALS, SPACE.topic(Stream.VITALS, UNIT), boom)
    assert put(box, Stream.VITALS) == box.first_seq
    with pytest.raises(ValueError):
        box.put(Stream.VIDEO, SPACE.topic(Stream.VIDEO, UNIT), lambda seq: b"x")


def test_concurrent_writers_get_unique_consecutive_seqs(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    seqs: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(50):
            seq = put(box, Stream.ECG)
            with lock:
                seqs.append(seq)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(seqs) == list(range(box.first_seq, box.first_seq + 200))


def test_a_corrupt_file_is_refused_with_an_outbox_error(tmp_path: Path) -> None:
    from ambulance_agent.outbox import OutboxError

    path = tmp_path / "o.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError):
        Outbox(path)


def test_a_new_outbox_seeds_every_counter_from_the_wall_clock_in_microseconds(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", wall_clock_s=lambda: 1_764_460_800.25)
    seed = 1_764_460_800_250_000
    assert box.first_seq == seed < 2**63
    assert {box.peek_seq(s) for s in (Stream.ECG, Stream.VITALS, Stream.GPS, Stream.PREALERT)} == {seed}
    assert put(box, Stream.ECG) == seed
    assert put(box, Stream.ECG) == seed + 1
    assert box.next_session() == seed, "sessions too: a new birth outranks the lost outbox's last will"


def test_a_lost_outbox_never_repeats_a_seq(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path)
    old = [put(box, Stream.ECG) for _ in range(50)] + [put(box, Stream.VITALS)]
    old_session = box.next_session()
    box.close()
    for leftover in tmp_path.glob("o.db*"):
        leftover.unlink()  # the tablet was replaced: outbox and counters gone

    again = Outbox(path)
    new_ecg = put(again, Stream.ECG)
    assert new_ecg > max(old)
    assert put(again, Stream.VITALS) > max(old)
    assert again.next_session() > old_session


def test_an_outbox_from_before_seeding_continues_its_counters(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        db.execute("INSERT INTO counters VALUES ('ecg', 41), ('__session__', 6)")
    box = Outbox(path)
    assert box.first_seq == 0
    assert put(box, Stream.ECG) == 42
    assert box.next_session() == 7
    assert put(box, Stream.VITALS) == 0, "a stream this unit never sent starts where it always did"


def test_a_new_outbox_never_trusts_an_implausible_clock_for_its_seed(tmp_path: Path) -> None:
    """A dead real-time-clock battery boots in 1970 (or before): two lost outboxes must not repeat seqs, and a
    negative seed would make every message unsendable (hostile tester)."""
    assert seq_seed(1_764_460_800.25) == 1_764_460_800_250_000  # a plausible clock: microseconds
    for bad in (0.0, 100.0, -100.0, 5_000_000_000.0):
        assert 2**61 <= seq_seed(bad) < 2**62
    first = Outbox(tmp_path / "a.db", wall_clock_s=lambda: 30.0)
    second = Outbox(tmp_path / "b.db", wall_clock_s=lambda: 30.0)
    try:
        assert first.first_seq != second.first_seq
        assert min(first.first_seq, second.first_seq) > 4_102_444_800_000_000  # above any clock seed
    finally:
        first.close()
        second.close()


# --- a full disk ---------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs), so SQLite meets SQLITE_FULL as on a full vehicle disk.  Needs root."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a 1 MiB tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (container without the capability)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)  # lazy: even if a failed test left it open


def ecg(box: Outbox) -> int:
    return box.put(Stream.ECG, SPACE.topic(Stream.ECG, UNIT), lambda seq: os.urandom(700))


def fill_with_vitals(box: Outbox) -> OutboxError | None:
    for _ in range(10_000):
        try:
            put(box, Stream.VITALS, 700)
        except OutboxError as exc:
            return exc
    return None


def test_a_full_disk_sheds_ecg_for_crew_messages_then_says_so(tiny_disk: Path) -> None:
    other = tiny_disk / "other-data"  # what filled the disk besides the outbox
    other.write_bytes(b"\0" * 200_000)
    box = Outbox(tiny_disk / "o.db")
    for _ in range(5000):
        ecg(box)
        if box.stats().disk_full:
            break
    stats = box.stats()
    assert stats.disk_full == 1, "the loop reached a full disk"
    assert stats.shed["ecg"] > 0, "the oldest ECG was shed to make room"
    assert (tiny_disk / "o.db-reserve").exists(), "the reserve is kept again after shedding"
    ecg_left = [m for m in box.pending(10_000) if m.stream is Stream.ECG]
    assert ecg_left
    assert ecg_left[0].seq > box.first_seq, "oldest first"
    assert put(box, Stream.PREALERT, 300) > 0
    # protected messages only, until not even shedding makes room: a clear error, every ECG shed first
    refused = fill_with_vitals(box)
    assert isinstance(refused, OutboxFullError)
    assert isinstance(refused, sqlite3.OperationalError), "the agent's telemetry loop counts it as an outbox error"
    assert "disk full" in str(refused)
    assert [m for m in box.pending(10_000) if m.stream is Stream.ECG] == []
    # acks on the full disk: delivered messages are not offered again
    count = box.stats().count
    delivered = box.pending(20)
    assert all(box.ack(m.id) for m in delivered)
    assert not any(box.ack(m.id) for m in delivered), "acked twice"
    assert box.stats().count == count - 20
    assert not {m.id for m in delivered} & {m.id for m in box.pending(10_000)}
    # space comes back: the next write deletes the delivered rows for good
    other.unlink()
    assert put(box, Stream.PREALERT, 300) > 0
    box.close()
    again = Outbox(tiny_disk / "o.db")
    assert not {m.id for m in delivered} & {m.id for m in again.pending(10_000)}
    assert again.stats().count == count - 20 + 1
    again.close()


def test_a_page_capped_file_meets_sqlite_full_and_sheds_ecg_without_root(tmp_path: Path) -> None:
    """The same path without a small filesystem: SQLite's own page cap raises the same SQLITE_FULL."""
    box = Outbox(tmp_path / "o.db")
    box._db.execute("PRAGMA max_page_count=60")  # 240 KiB with 4 KiB pages
    for _ in range(1000):
        ecg(box)
        if box.stats().disk_full:
            break
    assert box.stats().disk_full == 1
    shed = box.stats().shed["ecg"]
    assert shed > 0
    assert put(box, Stream.PREALERT, 300) > 0
    assert put(box, Stream.STATUS, 300) > 0
    streams = [m.stream for m in box.pending(1000)]
    assert streams[:2] == [Stream.PREALERT, Stream.STATUS]
    refused = fill_with_vitals(box)
    assert refused is not None
    assert Stream.ECG not in [m.stream for m in box.pending(1000)], "every ECG shed before a protected one fails"
    box.close()
