"""Team activation with acknowledgement and escalation: pure functions over the contract's ``Activation``.

A pre-alert pages every department its pathway needs (:func:`dispatch.destination.departments_for`) at level
``primary`` with an acknowledgement deadline ``escalate_at = paged_at + ack timeout``.  An acknowledgement closes
the page; a missed deadline escalates it ``primary -> backup -> supervisor`` (state ``escalated``), each step with
a new deadline; past the supervisor the supervisor is paged again, so an unanswered activation never goes quiet.

Why: a remote display is not the primary alarm system (IEC 60601-1-8; DOMAIN.md section 8), so the board's
alerts are notifications that must escalate when nobody answers; an audible push alert cut "ECG received -> cath
lab activated" from 9.1 to 3.3 min (WestJEM, Goebel & Bledsoe; DOMAIN.md section 1).  The default timeouts of
:data:`DEFAULT_ACK_TIMEOUT_S` are a configurable assumption, not a guideline figure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from broker_config import Activation, ActivationState, Department, Priority

__all__ = [
    "DEFAULT_ACK_TIMEOUT_S",
    "ESCALATION_LEVELS",
    "Escalation",
    "acknowledge",
    "escalate_due",
    "next_deadline",
    "page",
]

Level = Literal["primary", "backup", "supervisor"]

ESCALATION_LEVELS: tuple[Level, ...] = ("primary", "backup", "supervisor")
"""Who is paged, in escalation order."""

DEFAULT_ACK_TIMEOUT_S: Mapping[Priority, float] = {Priority.HIGH: 120.0, Priority.MEDIUM: 300.0, Priority.LOW: 600.0}
"""Seconds a page waits for an acknowledgement before it escalates, by alert priority (configurable assumption)."""

_OPEN = (ActivationState.PAGED, ActivationState.ESCALATED)


@dataclass(frozen=True, slots=True)
class Escalation:
    """One escalation step: the department, the level now paged, and whether it is a repeat at the top level."""

    department: Department
    level: Level
    repeat: bool


def page(departments: Iterable[Department], paged_at: datetime, timeout_s: float) -> tuple[Activation, ...]:
    """Primary pages for ``departments`` at ``paged_at`` (UTC), each escalating ``timeout_s`` seconds later."""
    deadline = paged_at + timedelta(seconds=timeout_s)
    return tuple(Activation(department=d, paged_at=paged_at, escalate_at=deadline) for d in dict.fromkeys(departments))


def acknowledge(
    activations: Sequence[Activation], department: Department | None, at: datetime, by_role: str
) -> tuple[tuple[Activation, ...], tuple[Department, ...]]:
    """Acknowledge one department's page (``department``) or every open page (``None``).

    Returns:
        ``(activations, acknowledged)``: the new tuple and the departments this call acknowledged (empty when
        they were already acknowledged or not activated).
    """
    out: list[Activation] = []
    done: list[Department] = []
    for a in activations:
        if a.state in _OPEN and (department is None or a.department is department):
            a = a.model_copy(
                update={
                    "state": ActivationState.ACKNOWLEDGED,
                    "escalate_at": None,
                    "acknowledged_at": at,
                    "acknowledged_by_role": by_role[:64],
                }
            )
            done.append(a.department)
        out.append(a)
    return tuple(out), tuple(done)


def escalate_due(
    activations: Sequence[Activation], now: datetime, timeout_s: float
) -> tuple[tuple[Activation, ...], tuple[Escalation, ...]]:
    """Escalate every open page whose deadline has passed at ``now`` by one level, with a new deadline.

    One step per call even when several deadlines were missed (a restarted service escalates gradually, each
    step visible).  Returns the new tuple and the steps taken.
    """
    out: list[Activation] = []
    steps: list[Escalation] = []
    for a in activations:
        if a.state in _OPEN and a.escalate_at is not None and a.escalate_at <= now:
            index = ESCALATION_LEVELS.index(a.level)
            level = ESCALATION_LEVELS[min(index + 1, len(ESCALATION_LEVELS) - 1)]
            a = a.model_copy(
                update={
                    "state": ActivationState.ESCALATED,
                    "level": level,
                    "escalate_at": now + timedelta(seconds=timeout_s),
                }
            )
            steps.append(Escalation(a.department, level, repeat=index == len(ESCALATION_LEVELS) - 1))
        out.append(a)
    return tuple(out), tuple(steps)


def next_deadline(activations: Iterable[Activation]) -> datetime | None:
    """The earliest ``escalate_at`` of the open pages, or None when nothing waits for an acknowledgement."""
    deadlines = [a.escalate_at for a in activations if a.state in _OPEN and a.escalate_at is not None]
    return min(deadlines) if deadlines else None
