"""Errors of the telemetry package: one root, attributes instead of message parsing (STYLE.md, "Errors")."""

from __future__ import annotations

__all__ = ["MigrationError", "StoreUnavailableError", "TelemetryError", "UnsupportedStoreError", "WriteError"]


class TelemetryError(Exception):
    """Root of every error raised by :mod:`telemetry`."""


class UnsupportedStoreError(TelemetryError, ValueError):
    """A store URL whose scheme is neither ``sqlite`` nor ``postgresql``.  ``scheme`` holds what was given."""

    def __init__(self, scheme: str) -> None:
        super().__init__(f"unsupported store URL scheme {scheme!r}: use sqlite:///path or postgresql://...")
        self.scheme = scheme


class StoreUnavailableError(TelemetryError, ConnectionError):
    """The database cannot be reached or is busy right now; the same call may succeed later (retry the batch).

    ``cause`` names the underlying exception class (psycopg.OperationalError, sqlite3.OperationalError...).
    """

    def __init__(self, cause: str) -> None:
        super().__init__(f"store unavailable ({cause})")
        self.cause = cause


class WriteError(TelemetryError):
    """The database refused the data itself (a constraint or type error): retrying the same rows cannot help.

    ``sqlstate`` is the PostgreSQL SQLSTATE when known, else ``None`` (SQLite).
    """

    def __init__(self, cause: str, sqlstate: str | None = None) -> None:
        super().__init__(f"store refused the rows ({cause}, sqlstate={sqlstate})")
        self.cause = cause
        self.sqlstate = sqlstate


class MigrationError(TelemetryError):
    """A migration file is misnamed, or the database holds a migration this code does not know."""
