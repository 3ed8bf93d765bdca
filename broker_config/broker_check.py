"""Start-up checks of a Mosquitto configuration, and the helpers that render the shipped templates.

Run before every broker start (systemd ``ExecStartPre``)::

    python -m broker_config.broker_check /etc/mosquitto/conf.d/goldenhour.conf

It exits non-zero, after logging each problem, when the configuration would lose messages or grant too much:

* persistence off, or a persistence directory the broker's user cannot write (FF-02: the only trace Mosquitto
  leaves is a "Permission denied" line at shutdown, after the queued messages are gone);
* ``max_queued_messages`` left at Mosquitto's default of 1000 (FF-19: QoS 1 messages silently dropped);
* an ACL file with ``pattern`` lines lacking ``%u``/``%c``, grants to anonymous clients, or topics outside the
  contract (FF-04);
* anonymous access on a listener that is not loopback-only.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import grp
import logging
import os
import pwd
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from broker_config.acl import lint_acl
from broker_config.topics import TopicSpace

__all__ = [
    "BrokerCheckError",
    "TEMPLATE_DIR",
    "broker_user",
    "check_config",
    "check_persistence_dir",
    "log_warnings",
    "main",
    "override_options",
    "render_config",
    "template_text",
]

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent / "mosquitto"
"""Where ``dev.conf`` and ``production.conf.template`` live."""

MOSQUITTO_DEFAULT_USER = "mosquitto"
"""The account Mosquitto drops to when started as root without a ``user`` option (``mosquitto.conf(5)``)."""
MOSQUITTO_DEFAULT_MAX_QUEUED = 1000

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class BrokerCheckError(RuntimeError):
    """A broker configuration that would lose messages or grant too much.  ``problems`` lists every finding."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# --- templates -----------------------------------------------------------------------------------------------


def template_text(name: str) -> str:
    """The text of a shipped configuration (``dev.conf``, ``production.conf.template``)."""
    return (TEMPLATE_DIR / name).read_text(encoding="utf-8")


def render_config(template: str, **values: object) -> str:
    """Fill ``{name}`` placeholders.  Placeholders without a value stay as they are (a test fixture fills ``{port}``).

    Raises:
        KeyError: a value is given for a placeholder the template does not have (a typo would otherwise pass).
    """
    present = set(_PLACEHOLDER.findall(template))
    unknown = set(values) - present
    if unknown:
        raise KeyError(f"the template has no placeholder {sorted(unknown)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


def override_options(config: str, **options: str | None) -> str:
    """Replace the first line of each option with ``option value``, append it when absent, or drop it for None.

    For single-valued options of the shipped configurations (``listener``, ``persistence_location``, ``user``...).
    """
    lines = config.splitlines()
    for option, value in options.items():
        index = next((i for i, line in enumerate(lines) if line.split(maxsplit=1)[:1] == [option]), None)
        if value is None:
            if index is not None:
                del lines[index]
        elif index is None:
            lines.append(f"{option} {value}")
        else:
            lines[index] = f"{option} {value}"
    return "\n".join(lines) + "\n"


# --- persistence directory -----------------------------------------------------------------------------------


def broker_user(configured: str | None = None) -> str:
    """The account whose rights matter for the broker's files.

    Started as root, Mosquitto drops to the ``user`` option (default ``mosquitto``); otherwise it keeps the
    account that started it.
    """
    if os.geteuid() != 0:
        return getpass.getuser()
    if configured:
        return configured
    try:
        pwd.getpwnam(MOSQUITTO_DEFAULT_USER)
    except KeyError:
        return "nobody"  # Mosquitto's fallback when its own account does not exist
    return MOSQUITTO_DEFAULT_USER


def _user_ids(user: str) -> tuple[int, set[int]]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise BrokerCheckError([f"user {user!r} does not exist on this host"]) from None
    groups = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    return entry.pw_uid, groups


def _permits(st: os.stat_result, uid: int, gids: set[int], wanted: int) -> bool:
    """Classic owner/group/other permission bits (``wanted`` from 0o1 execute, 0o2 write, 0o4 read)."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        bits = (st.st_mode >> 6) & 0o7
    elif st.st_gid in gids:
        bits = (st.st_mode >> 3) & 0o7
    else:
        bits = st.st_mode & 0o7
    return bits & wanted == wanted


def _unreadable(path: Path, user: str) -> str | None:
    """Why ``user`` cannot read ``path``, or None."""
    if user == getpass.getuser():
        return None if os.access(path, os.R_OK) else "not readable"
    uid, gids = _user_ids(user)
    resolved = path.resolve()
    for ancestor in reversed(resolved.parents):
        if not _permits(ancestor.stat(), uid, gids, 0o1):
            return f"user {user!r} cannot enter {ancestor}"
    return None if _permits(resolved.stat(), uid, gids, 0o4) else f"not readable for user {user!r}"


def check_persistence_dir(path: Path | str, *, user: str | None = None) -> None:
    """Raise :class:`BrokerCheckError` unless the broker can create and replace its database in ``path`` (FF-02).

    Args:
        path: the ``persistence_location`` directory.
        user: the broker's account.  None or the current account: a probe file is created and removed (this also
            honours POSIX ACLs and read-only mounts).  Another account: every ancestor must be searchable and the
            directory writable for it by the permission bits (run the check as that account for ACLs).
    """
    directory = Path(path)
    if not directory.exists():
        raise BrokerCheckError([f"persistence directory {directory} does not exist"])
    if not directory.is_dir():
        raise BrokerCheckError([f"persistence location {directory} is not a directory"])
    with contextlib.suppress(OSError):
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            raise BrokerCheckError([f"persistence directory {directory} is on a read-only file system"])
    if user is None or user == getpass.getuser():
        try:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".broker-check-"):
                pass
        except OSError as exc:
            raise BrokerCheckError([f"persistence directory {directory} is not writable: {exc.strerror}"]) from None
        return
    uid, gids = _user_ids(user)
    resolved = directory.resolve()
    for ancestor in reversed(resolved.parents):
        if not _permits(ancestor.stat(), uid, gids, 0o1):
            raise BrokerCheckError([f"user {user!r} cannot enter {ancestor} on the way to {resolved}"])
    if not _permits(resolved.stat(), uid, gids, 0o3):
        raise BrokerCheckError([f"persistence directory {resolved} is not writable for user {user!r}"])
    database = resolved / "mosquitto.db"
    if database.exists() and not _permits(database.stat(), uid, gids, 0o4):
        raise BrokerCheckError([f"{database} is not readable for user {user!r}: the saved sessions would be lost"])


# --- the whole configuration ---------------------------------------------------------------------------------


def _options(config: str) -> list[tuple[str, str]]:
    pairs = []
    for raw in config.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            option, _, value = line.partition(" ")
            pairs.append((option, value.strip()))
    return pairs


def check_config(config_file: Path | str, *, space: TopicSpace | None = None) -> None:
    """Check a rendered Mosquitto configuration before start; raise :class:`BrokerCheckError` with every problem.

    Relative paths are taken from the current directory, as Mosquitto does.
    """
    path = Path(config_file)
    pairs = _options(path.read_text(encoding="utf-8"))
    values: dict[str, str] = {}
    for option, value in pairs:
        values.setdefault(option, value)
    problems: list[str] = []

    if values.get("persistence", "false") != "true":
        problems.append("persistence is off: a restart forgets every persistent session (FF-02)")
    else:
        location = values.get("persistence_location", ".")
        try:
            check_persistence_dir(Path(location), user=broker_user(values.get("user")))
        except BrokerCheckError as exc:
            problems += exc.problems
    queued = values.get("max_queued_messages", str(MOSQUITTO_DEFAULT_MAX_QUEUED))
    if not queued.isdigit():
        problems.append(f"max_queued_messages {queued!r} is not a number")
    elif int(queued) == MOSQUITTO_DEFAULT_MAX_QUEUED:
        problems.append("max_queued_messages is Mosquitto's default 1000: QoS 1 messages will be dropped (FF-19)")

    if values.get("allow_anonymous", "false") == "true":
        hosts = [value.split()[1] if len(value.split()) > 1 else "" for option, value in pairs if option == "listener"]
        if not hosts or any(host not in _LOOPBACK for host in hosts):
            problems.append("allow_anonymous true on a listener that is not loopback-only")
    acl_file = values.get("acl_file")
    if acl_file:
        try:
            text = Path(acl_file).read_text(encoding="utf-8")
        except OSError as exc:
            problems.append(f"acl_file {acl_file} cannot be read: {exc.strerror}")
        else:
            problems += [f"acl_file: {p}" for p in lint_acl(text, space or TopicSpace())]
    user = broker_user(values.get("user"))
    for option in ("password_file", "acl_file", "crlfile", "cafile", "certfile", "keyfile"):
        for name, value in pairs:
            if name != option:
                continue
            if not Path(value).is_file():
                problems.append(f"{option} {value} does not exist")
            elif reason := _unreadable(Path(value), user):
                problems.append(f"{option} {value}: {reason} (Mosquitto re-reads it on SIGHUP as that user)")
    if problems:
        raise BrokerCheckError(problems)


def log_warnings(log_text: str, *, ignore: Mapping[str, str] | None = None) -> list[str]:
    """The warning and error lines of a Mosquitto log (e.g. "ACL pattern ... does not contain '%c' or '%u'").

    ``ignore`` maps a substring to the reason it is acceptable (for instance the run-as-root warning in tests).
    """
    found = []
    for line in log_text.splitlines():
        if ("Warning:" in line or "Error:" in line) and not any(key in line for key in (ignore or {})):
            found.append(line)
    return found


def main(argv: list[str] | None = None) -> int:
    """``python -m broker_config.broker_check CONFIG``: 0 when the configuration passes, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="python -m broker_config.broker_check",
        description="Start-up checks of a Mosquitto configuration (persistence, queue budget, ACL, listeners);"
        " exits 1 after logging each problem.",
    )
    parser.add_argument("config", type=Path, help="the Mosquitto configuration file to check")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_config(args.config)
    except BrokerCheckError as exc:
        for problem in exc.problems:
            logger.error("broker configuration: %s", problem)
        return 1
    except OSError as exc:
        logger.error("broker configuration cannot be read: %s", exc.strerror)
        return 1
    logger.info("broker configuration passes the start-up checks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
