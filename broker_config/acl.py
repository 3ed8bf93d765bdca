"""Mosquitto access control generated from the topic contract: who may read and write which stream.

Rights live in one table, :data:`ROLE_RIGHTS` (role -> streams read, streams written); :func:`generate_acl` turns
the table, the fleet's unit ids and the service accounts into Mosquitto ``acl_file`` text.  Every topic in the
output comes from :class:`broker_config.topics.TopicSpace`; nothing here spells a topic.

Rules the generator keeps (FF-04, DOMAIN.md section 11):

* ``user`` + ``topic`` lines only.  No ``pattern`` lines: Mosquitto applies a pattern to *every* client whatever
  ``user`` line precedes it, so a pattern without ``%u``/``%c`` grants everyone, and even a ``%u`` pattern would let
  a service account named like a unit act as that unit.  Per-user blocks also make revocation a matter of deleting
  one block.
* Nothing before the first ``user`` line: those lines would apply to anonymous clients.
* A unit writes only its own unit-scoped streams and reads only its own dispatch notice.
* One line per stream (``{scope}/{id or +}/{stream}``), so nobody can publish outside the grammar and every line
  reads as a contract filter.  Mosquitto 2.0 checks read rights on every delivered message, not at SUBSCRIBE: a
  subscription to :meth:`TopicSpace.all_of_scope` or even ``#`` is acknowledged, yet only granted streams arrive
  (a SUBACK proves nothing; the integration tests check deliveries).

Mosquitto reloads the ACL on SIGHUP (``kill -HUP``) without dropping connections; the new rules apply to the
existing sessions at once (``mosquitto.conf(5)``, ``acl_file``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from broker_config.topics import STREAMS, Scope, Stream, TopicError, TopicSpace, valid_id

__all__ = [
    "Access",
    "Grant",
    "Rights",
    "Role",
    "ROLE_RIGHTS",
    "UNIT_STREAMS",
    "generate_acl",
    "grants_for",
    "lint_acl",
]


class Role(StrEnum):
    """What a broker account is.  Units are the vehicles; the others are service accounts."""

    UNIT = "unit"
    INGEST = "ingest"
    DISPATCH = "dispatch"
    BOARD = "board"


class Access(StrEnum):
    """Mosquitto's access words on a ``topic`` line."""

    READ = "read"
    WRITE = "write"
    READWRITE = "readwrite"


@dataclass(frozen=True, slots=True)
class Rights:
    """What one role may do.

    Attributes:
        reads: streams the role may receive.
        writes: streams the role may publish.
        own_only: the id in the topic must be the account's own (a unit); otherwise any owner (``+``).
    """

    reads: frozenset[Stream]
    writes: frozenset[Stream]
    own_only: bool = False


UNIT_STREAMS: frozenset[Stream] = frozenset(s for s, spec in STREAMS.items() if spec.scope is Scope.UNIT)
"""Every stream a unit publishes about itself (availability, status, vitals, ecg, gps, prealert, video)."""

ROLE_RIGHTS: Mapping[Role, Rights] = MappingProxyType(
    {
        Role.UNIT: Rights(reads=frozenset({Stream.NOTICE, Stream.RECEIPT}), writes=UNIT_STREAMS, own_only=True),
        Role.INGEST: Rights(reads=UNIT_STREAMS, writes=frozenset({Stream.GAP, Stream.RECEIPT})),
        Role.DISPATCH: Rights(
            reads=frozenset({Stream.PREALERT, Stream.GPS, Stream.STATUS, Stream.AVAILABILITY, Stream.ACK}),
            writes=frozenset({Stream.ALERT, Stream.NOTICE}),
        ),
        # The board also reads acks: every screen of a hospital shows the acknowledgement made on any other one
        # (hospital_board.sources.BOARD_STREAMS subscribes to them).  Acks carry ids and a role, no health data.
        Role.BOARD: Rights(
            reads=frozenset(
                {
                    Stream.ALERT,
                    Stream.ACK,
                    Stream.AVAILABILITY,
                    Stream.STATUS,
                    Stream.VITALS,
                    Stream.ECG,
                    Stream.GPS,
                    Stream.GAP,
                }
            ),
            writes=frozenset({Stream.ACK}),
        ),
    }
)
"""The single table of rights: role -> (streams read, streams written).  The ACL is derived from nothing else."""


@dataclass(frozen=True, slots=True, order=True)
class Grant:
    """One ``topic`` line of the ACL: an access word and a topic filter."""

    topic_filter: str
    access: Access

    def line(self) -> str:
        """The line as Mosquitto reads it."""
        return f"topic {self.access.value} {self.topic_filter}"


def grants_for(space: TopicSpace, role: Role, account: str) -> list[Grant]:
    """The ``topic`` lines of one account, derived from :data:`ROLE_RIGHTS`.  Sorted, one line per filter.

    Raises:
        TopicError: ``account`` is not an opaque id.
    """
    valid_id(account)
    rights = ROLE_RIGHTS[role]
    owner = account if rights.own_only else "+"
    access: dict[str, set[Access]] = {}
    for stream in rights.writes:
        access.setdefault(space.filter(stream, owner), set()).add(Access.WRITE)
    for stream in rights.reads:
        access.setdefault(space.filter(stream, owner), set()).add(Access.READ)
    grants = [
        Grant(topic_filter, Access.READWRITE if len(words) == 2 else next(iter(words)))
        for topic_filter, words in access.items()
    ]
    return sorted(grants)


def generate_acl(space: TopicSpace, units: Iterable[str], services: Mapping[str, Role]) -> str:
    """Mosquitto ``acl_file`` text for the fleet's units and the service accounts.

    Args:
        space: the topic space (empty prefix in production).
        units: unit ids; each is also the unit's broker username (its certificate CN).
        services: service account name -> role (``ingest``, ``dispatch``, ``board``).

    Raises:
        ValueError: an id is not opaque, a name is both a unit and a service, or a service has the unit role.
    """
    unit_ids = sorted(set(units))
    for unit in unit_ids:
        try:
            valid_id(unit)
        except TopicError as exc:
            raise ValueError(f"unit id {exc.reason}") from None
    for name, role in services.items():
        try:
            valid_id(name)
        except TopicError as exc:
            raise ValueError(f"service name {exc.reason}") from None
        if role is Role.UNIT:
            raise ValueError(f"service {name!r} cannot have the unit role; list it among the units")
        if name in unit_ids:
            raise ValueError(f"{name!r} is both a unit and a service account")
    lines = [
        "# GoldenHour Mosquitto ACL, generated by broker_config.acl from the topic contract. Do not edit by hand:",
        "# regenerate it (broker_config.provision add_unit / revoke), then reload the broker with SIGHUP.",
        "# No line precedes the first 'user' line (those would apply to anonymous clients) and there are no",
        "# 'pattern' lines (they apply to every client, FF-04).",
    ]
    for name in sorted(services):
        role = services[name]
        lines += ["", f"# role {role.value}", f"user {name}"]
        lines += [grant.line() for grant in grants_for(space, role, name)]
    for unit in unit_ids:
        lines += ["", "# role unit", f"user {unit}"]
        lines += [grant.line() for grant in grants_for(space, Role.UNIT, unit)]
    return "\n".join(lines) + "\n"


_SUBSTITUTION = re.compile(r"%[uc]")


def lint_acl(text: str, space: TopicSpace) -> list[str]:
    """Problems in an ACL file (empty list: none).  Used by the start-up check on a hand-edited or stale file.

    Reports ``pattern`` lines without ``%u``/``%c`` (FF-04), grants that precede every ``user`` line (anonymous),
    unknown keywords, and topic filters outside the contract's grammar.
    """
    problems: list[str] = []
    seen_user = False
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        rest = rest.strip()
        if keyword == "user":
            seen_user = True
            continue
        if keyword not in {"topic", "pattern"}:
            problems.append(f"line {number}: unknown keyword {keyword!r}")
            continue
        words = rest.split(" ", 1)
        if len(words) == 2 and words[0] in {"read", "write", "readwrite", "deny"}:
            topic_filter = words[1].strip()
        else:
            topic_filter = rest
        if keyword == "pattern" and not _SUBSTITUTION.search(topic_filter):
            problems.append(f"line {number}: pattern without %u or %c applies to every client")
        if keyword == "topic" and not seen_user:
            problems.append(f"line {number}: topic line before any user line grants anonymous clients")
        reason = _off_grammar(space, topic_filter)
        if reason:
            problems.append(f"line {number}: {reason}")
    return problems


def _off_grammar(space: TopicSpace, topic_filter: str) -> str | None:
    """Why a filter is outside the grammar, or None.  ``+`` and ``%u``/``%c`` may stand for an id or a stream."""
    root = space.root + "/"
    if not topic_filter.startswith(root):
        return f"filter {topic_filter[:120]!r} is outside the topic space"
    levels = topic_filter[len(root) :].split("/")
    if len(levels) != 3:
        return f"filter {topic_filter[:120]!r} is not {{scope}}/{{id}}/{{stream}}"
    scope_s, owner, stream_s = levels
    try:
        scope = Scope(scope_s)
    except ValueError:
        return f"filter {topic_filter[:120]!r} has an unknown scope"
    if owner not in {"+", "%u", "%c"}:
        try:
            valid_id(owner)
        except TopicError:
            return f"filter {topic_filter[:120]!r} has an id that is not opaque"
    if stream_s != "+":
        try:
            stream = Stream(stream_s)
        except ValueError:
            return f"filter {topic_filter[:120]!r} has an unknown stream"
        if STREAMS[stream].scope is not scope:
            return f"filter {topic_filter[:120]!r} puts a stream under the wrong scope"
    return None
