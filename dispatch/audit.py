"""The audit trail: who read or changed which patient's data, when and from where, in a hash chain.

Every row stores ``hash = SHA-256(prev_hash || canonical(row))`` where ``prev_hash`` is the previous row's hash
(64 zeros for the first row) and ``canonical(row)`` is the row's content as JSON with sorted keys and no spaces
(timestamps ISO 8601 UTC with microseconds).  Changing any field of a stored row, deleting a row in the middle or
re-ordering rows breaks the chain at that row, and :func:`verify_chain` reports the first broken link.  Truncating
the tail is invisible to the chain alone: anchor the head (``GET /api/audit/verify`` returns it) somewhere else,
e.g. in a daily report, to detect that too.

Rows carry opaque ids only (username, role, hospital/unit/alert/incident ids, client address, action): never a
patient's name, vital sign or free text, so the trail itself is no second copy of the health record.

Pure functions; persistence is the repository's (``append_audit`` computes the hash inside the same transaction
that reads the previous row, so concurrent writers cannot fork the chain).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from enum import StrEnum

__all__ = [
    "GENESIS_HASH",
    "AuditAction",
    "AuditDraft",
    "AuditEntry",
    "ChainReport",
    "canonical",
    "chain_hash",
    "seal",
    "verify_chain",
]

GENESIS_HASH = "0" * 64


class AuditAction(StrEnum):
    """What was done.  ``*.read`` are reads of a patient's data by a person; the rest are changes."""

    ALERT_READ = "alert.read"
    INCIDENT_READ = "incident.read"
    CASE_TIMELINE_READ = "case.timeline.read"
    REPORT_EXPORT = "report.export"
    BOARD_SNAPSHOT_READ = "board.snapshot.read"
    BOARD_DETAIL_READ = "board.detail.read"
    BOARD_TIMELINE_READ = "board.timeline.read"
    BOARD_FEED_SUBSCRIBE = "board.feed.subscribe"
    BOARD_FEED_END = "board.feed.end"
    ALERT_ACK = "alert.ack"
    INCIDENT_CREATE = "incident.create"
    INCIDENT_ASSIGN = "incident.assign"
    INCIDENT_CANCEL = "incident.cancel"
    CASE_EVENT_ADD = "case.event.add"
    HOSPITAL_STATUS_UPDATE = "hospital.status.update"
    ACCOUNT_CREATE = "account.create"
    ACCOUNT_UPDATE = "account.update"
    AUDIT_READ = "audit.read"
    ACCESS_DENIED = "access.denied"


BOARD_ACTIONS = frozenset(
    {
        AuditAction.BOARD_SNAPSHOT_READ,
        AuditAction.BOARD_DETAIL_READ,
        AuditAction.BOARD_TIMELINE_READ,
        AuditAction.BOARD_FEED_SUBSCRIBE,
        AuditAction.BOARD_FEED_END,
        AuditAction.ALERT_ACK,
        AuditAction.ACCESS_DENIED,
    }
)
"""What the board may report to dispatch's trail (``POST /api/audit/events``)."""


@dataclass(frozen=True, slots=True)
class AuditDraft:
    """An audit row before it has a place in the chain.  Every text is an id or a short label (no health data)."""

    at: datetime
    actor: str
    role: str
    action: str
    """An :class:`AuditAction` value."""
    actor_hospital_id: str | None = None
    object_type: str | None = None
    object_id: str | None = None
    unit_id: str | None = None
    alert_id: str | None = None
    incident_id: str | None = None
    hospital_id: str | None = None
    """The hospital whose patient it is (or whose status changed)."""
    client_addr: str | None = None
    outcome: str = "ok"
    reported_by: str | None = None
    """The service that reported the event (the board), None when dispatch saw it itself."""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class AuditEntry(AuditDraft):
    """A stored audit row: its place (``seq``, 1-based, no gaps) and its link in the chain."""

    seq: int = 0
    prev_hash: str = GENESIS_HASH
    hash: str = ""


_CONTENT_FIELDS = tuple(f.name for f in fields(AuditEntry) if f.name != "hash")


def canonical(entry: AuditEntry) -> bytes:
    """The row's content (every field except ``hash``) as canonical JSON bytes."""
    doc: dict[str, object] = {}
    for name in _CONTENT_FIELDS:
        value = getattr(entry, name)
        if isinstance(value, datetime):
            value = value.astimezone(UTC).isoformat(timespec="microseconds")
        elif isinstance(value, StrEnum):
            value = value.value
        doc[name] = value
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def chain_hash(prev_hash: str, entry: AuditEntry) -> str:
    """SHA-256 (hex) of the previous row's hash followed by this row's canonical content."""
    return hashlib.sha256(prev_hash.encode("ascii") + canonical(entry)).hexdigest()


def seal(draft: AuditDraft, seq: int, prev_hash: str) -> AuditEntry:
    """Give a draft its place after the row ``seq - 1`` whose hash is ``prev_hash``."""
    values = {f.name: getattr(draft, f.name) for f in fields(AuditDraft)}
    values["detail"] = str(values["detail"])[:200]
    entry = AuditEntry(**values, seq=seq, prev_hash=prev_hash)
    return replace(entry, hash=chain_hash(prev_hash, entry))


@dataclass(frozen=True, slots=True)
class ChainReport:
    """Result of a verification: ``ok``, rows checked, the first broken row and why, the head hash."""

    ok: bool
    checked: int
    first_broken_seq: int | None
    reason: str | None
    head_hash: str


def verify_chain(entries: Iterable[AuditEntry]) -> ChainReport:
    """Walk the rows in ``seq`` order and report the first row whose link or content does not verify."""
    prev = GENESIS_HASH
    expected_seq = 1
    checked = 0
    for entry in entries:
        reason: str | None = None
        if entry.seq != expected_seq:
            reason = f"sequence gap: expected {expected_seq}, found {entry.seq}"
        elif entry.prev_hash != prev:
            reason = "previous-hash link does not match the previous row"
        elif chain_hash(prev, entry) != entry.hash:
            reason = "content does not match its hash"
        if reason is not None:
            return ChainReport(False, checked, entry.seq, reason, prev)
        prev = entry.hash
        expected_seq += 1
        checked += 1
    return ChainReport(True, checked, None, None, prev)
