"""Numbered SQL migrations, recorded in a ``schema_migrations`` table.

Files live in ``telemetry/migrations/{postgres,sqlite}/NNNN_name.sql``; each is applied once, in number order, in
its own transaction together with its ``schema_migrations`` row, so a failed migration leaves nothing half done.
Applying is idempotent: already recorded versions are skipped.  ``migrate(url)`` is the command-line entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from telemetry.errors import MigrationError

__all__ = ["Dialect", "Migration", "load_migrations", "migrate"]

Dialect = Literal["postgres", "sqlite"]

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file: its number, its name and its SQL text."""

    version: int
    name: str
    sql: str


def load_migrations(dialect: Dialect) -> list[Migration]:
    """The migrations shipped for ``dialect``, in version order.

    Raises:
        MigrationError: a ``.sql`` file not named ``NNNN_name.sql``, or two files with one number.
    """
    folder = resources.files("telemetry.migrations") / dialect
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _NAME.fullmatch(entry.name)
        if match is None:
            raise MigrationError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two {dialect} migrations numbered {version:04d}")
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def migrate(url: str) -> list[int]:
    """Open the store at ``url``, apply its pending migrations and close it.

    Returns:
        The versions applied by this call (empty when the schema was already current).

    Raises:
        telemetry.errors.StoreUnavailableError: the database cannot be reached.
        MigrationError: the database records a version newer than this code knows.
    """
    from telemetry.store import open_store  # store imports this module: import late

    store = open_store(url)
    try:
        return await store.migrate()
    finally:
        await store.close()
