"""Errors of the dispatch service: one root class, attributes instead of message parsing (STYLE.md, Errors)."""

from __future__ import annotations

__all__ = [
    "DispatchError",
    "RegistryError",
    "UnknownHospitalError",
    "RoutingError",
    "OutsideNetworkError",
    "NoRouteError",
    "StoreError",
    "IncidentError",
    "UnknownIncidentError",
    "UnknownUnitError",
    "UnitUnavailableError",
    "IncidentClosedError",
    "TimelineOrderError",
    "AuthError",
    "InvalidCredentialsError",
    "AccountLockedError",
    "SecondFactorRequiredError",
    "AccountExistsError",
    "UnknownAccountError",
    "InvalidRefreshTokenError",
]


class DispatchError(Exception):
    """Root of every error raised by the dispatch package."""


class RegistryError(DispatchError):
    """The hospital data files are inconsistent (for example a kept hospital has no capabilities entry).

    Attributes:
        path: the file at fault, as given by the caller.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{reason} ({path})")
        self.path = path
        self.reason = reason


class UnknownHospitalError(DispatchError, KeyError):
    """No hospital with this id in the registry.  ``hospital_id`` holds the id asked for."""

    def __init__(self, hospital_id: str) -> None:
        super().__init__(hospital_id)
        self.hospital_id = hospital_id


class RoutingError(DispatchError):
    """Root of road-routing failures."""


class OutsideNetworkError(RoutingError):
    """A point is farther than the snapping limit from every road of the graph.

    Attributes:
        point_deg: the (lat, lon) asked for; snap_distance_m: distance to the nearest routable node.
    """

    def __init__(self, point_deg: tuple[float, float], snap_distance_m: float) -> None:
        super().__init__(f"point is {snap_distance_m:.0f} m from the road network")
        self.point_deg = point_deg
        self.snap_distance_m = snap_distance_m


class NoRouteError(RoutingError):
    """The two points snap to nodes with no directed path between them."""


class StoreError(DispatchError):
    """The dispatch database cannot be reached, refused a write, or has a schema newer than this code.

    Attributes:
        cause: the class name of the underlying exception (psycopg.OperationalError, sqlite3.OperationalError...).
    """

    def __init__(self, reason: str, cause: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause


class IncidentError(DispatchError):
    """Root of incident and assignment errors."""


class UnknownIncidentError(IncidentError, KeyError):
    """No incident with this id.  ``incident_id`` holds the id asked for."""

    def __init__(self, incident_id: str) -> None:
        super().__init__(incident_id)
        self.incident_id = incident_id


class UnknownUnitError(IncidentError, KeyError):
    """No unit with this id has been seen on the bus.  ``unit_id`` holds the id asked for."""

    def __init__(self, unit_id: str) -> None:
        super().__init__(unit_id)
        self.unit_id = unit_id


class UnitUnavailableError(IncidentError):
    """The unit cannot take the job (offline, or busy with another incident).  ``unit_id``, ``reason``."""

    def __init__(self, unit_id: str, reason: str) -> None:
        super().__init__(f"unit {unit_id} unavailable: {reason}")
        self.unit_id = unit_id
        self.reason = reason


class IncidentClosedError(IncidentError):
    """The incident is closed or cancelled and cannot change.  ``incident_id``, ``state``."""

    def __init__(self, incident_id: str, state: str) -> None:
        super().__init__(f"incident {incident_id} is {state}")
        self.incident_id = incident_id
        self.state = state


class TimelineOrderError(IncidentError):
    """A time point posted by a person breaks the ordering rules.  ``violations`` lists them in plain words."""

    def __init__(self, violations: list[str]) -> None:
        super().__init__("; ".join(violations))
        self.violations = violations


class AuthError(DispatchError):
    """Sign-in or account management refused.  Messages are safe to show and to log (no secret, no password)."""


class InvalidCredentialsError(AuthError):
    """Unknown user, wrong password, wrong or replayed second factor, or a disabled account (one answer for all)."""


class AccountLockedError(AuthError):
    """Too many failed sign-ins: the account is locked until ``locked_until`` (UTC)."""

    def __init__(self, locked_until: object) -> None:
        super().__init__("account locked after repeated failed sign-ins")
        self.locked_until = locked_until


class SecondFactorRequiredError(AuthError):
    """The password was right but the account needs a TOTP code and none was given (no failure is counted)."""


class AccountExistsError(AuthError):
    """An account with this username already exists."""


class UnknownAccountError(AuthError):
    """No account with this username."""


class InvalidRefreshTokenError(AuthError):
    """A refresh token that is unknown, expired, revoked or already used (reuse revokes the whole session)."""
