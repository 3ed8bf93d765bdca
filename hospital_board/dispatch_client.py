"""The board's HTTP client of dispatch: hospital names and positions, open alerts to resync, routes, timelines.

Dispatch is optional for the board: every call is bounded by ``timeout_s``, every failure is logged with ids
only and turned into :class:`DispatchUnavailableError` (or a fallback), and nothing here ever runs on the MQTT
receive path.  Responses are parsed tolerantly (unknown fields ignored), like MQTT payloads.

Endpoints used (dispatch/api.py):

* ``GET /api/hospitals``: ``[{hospital_id, name, lat_deg, lon_deg, ...}]``, cached for ``cache_s``.
* ``GET /api/alerts``: every pre-alert, newest first (no findings, no activations).
* ``GET /api/alerts/{alert_id}``: one alert with findings and the dispatch timeline.
* ``GET /api/route?from=lat,lon&to=lat,lon``: a road route (points, distance, emergency driving time).
* ``POST /api/audit/events``: the board's people's reads and acknowledgements, for dispatch's audit trail.
* ``POST /api/auth/login|refresh|logout``: a person's sign-in, forwarded (:meth:`DispatchClient.forward_auth`).

Authentication: the board signs in as its service account (``credentials``) and sends the short-lived access token
it gets as ``Authorization: Bearer``; it signs in again shortly before expiry or after a 401.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from broker_config import AlertState, CaseType, Department, Findings, HospitalAlert, Priority, valid_id
from broker_config.topics import TopicError

__all__ = [
    "DispatchClient",
    "DispatchUnavailableError",
    "HospitalDirectory",
    "HospitalInfo",
    "RouteInfo",
    "TimelineItem",
]

logger = logging.getLogger(__name__)

_REASON_MAX = 200


class DispatchUnavailableError(Exception):
    """Dispatch could not answer (no URL, timeout, connection refused, non-2xx, unparseable).  ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class HospitalInfo(_Tolerant):
    """A hospital as dispatch lists it (only what the board needs)."""

    hospital_id: str
    name: str
    lat_deg: float | None = None
    lon_deg: float | None = None


class _AlertRow(_Tolerant):
    alert_id: str
    unit_id: str
    hospital_id: str
    case_type: CaseType
    priority: Priority
    state: AlertState
    departments: list[Department] = []
    eta_at: datetime | None = None
    created_at: datetime
    historical: bool = False
    reasons: list[str] = []


class TimelineItem(_Tolerant):
    """One time point of dispatch's timeline of an alert."""

    at: datetime
    source: str
    kind: str
    detail: str = ""
    historical: bool = False


class _AlertDetail(_AlertRow):
    findings: dict[str, Any] = {}
    timeline: list[TimelineItem] = []


class RouteInfo(_Tolerant):
    """A road route: ``points_deg`` [(lat, lon), ...], ``distance_m``, emergency driving ``duration_s``."""

    points_deg: list[tuple[float, float]]
    distance_m: float
    duration_s: float


@dataclass(slots=True)
class _Cache:
    hospitals: dict[str, HospitalInfo]
    fetched_at_s: float


class DispatchClient:
    """Bounded, cached calls to dispatch's API.

    Args:
        client: the process's ``httpx.AsyncClient`` (None: dispatch is not configured).
        base_url: dispatch's base URL (None: not configured).
        timeout_s: deadline of every call.
        cache_s: how long the hospital list is reused.
        retry_after_s: after a failed hospital-list fetch, how long to answer from the cache (or ids) first.
    """

    def __init__(
        self,
        client: httpx.AsyncClient | None,
        base_url: str | None,
        *,
        timeout_s: float = 2.0,
        cache_s: float = 300.0,
        retry_after_s: float = 30.0,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self._credentials = credentials
        self._token: str | None = None
        self._token_expires_s = 0.0
        self._token_lock = asyncio.Lock()
        self._client = client
        self._base_url = base_url.rstrip("/") if base_url else None
        self._timeout_s = timeout_s
        self._cache_s = cache_s
        self._retry_after_s = retry_after_s
        self._cache: _Cache | None = None
        self._failed_at_s: float | None = None
        self._lock = asyncio.Lock()

    @property
    def configured(self) -> bool:
        """Whether a dispatch URL is set."""
        return self._client is not None and self._base_url is not None

    async def _service_token(self, *, renew: bool = False) -> str | None:
        """The service account's access token, signing in when there is none, it is near expiry or ``renew``."""
        if self._credentials is None or self._client is None or self._base_url is None:
            return None
        async with self._token_lock:
            if not renew and self._token is not None and time.monotonic() < self._token_expires_s:
                return self._token
            client_id, secret = self._credentials
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.post(
                    f"{self._base_url}/api/auth/login", json={"username": client_id, "password": secret}
                )
            response.raise_for_status()
            try:
                body = response.json()
                self._token = str(body["access_token"])
                self._token_expires_s = time.monotonic() + max(0.0, float(body["expires_in"]) - 60.0)
            except (KeyError, TypeError, ValueError):
                raise DispatchUnavailableError("bad service sign-in answer") from None
            return self._token

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self._client is None or self._base_url is None:
            raise DispatchUnavailableError("not configured")
        for attempt in (1, 2):
            token = await self._service_token(renew=attempt == 2)
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.request(method, f"{self._base_url}{path}", headers=headers, **kwargs)
            if response.status_code != 401 or token is None:
                break
        response.raise_for_status()
        return response

    async def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        try:
            response = await self._request("GET", path, params=params)
            return response.json()
        except TimeoutError:
            raise DispatchUnavailableError("timeout") from None
        except httpx.HTTPStatusError as exc:
            raise DispatchUnavailableError(f"http {exc.response.status_code}") from None
        except httpx.HTTPError as exc:
            raise DispatchUnavailableError(type(exc).__name__) from None
        except ValueError:
            raise DispatchUnavailableError("not JSON") from None

    async def revoked_sessions(self) -> dict[str, datetime]:
        """Sessions dispatch has ended before their tokens expire (``GET /api/auth/revoked``): id -> until (UTC).

        Raises:
            DispatchUnavailableError: not configured, unreachable, or an unexpected answer.
        """
        body = await self._get("/api/auth/revoked")
        try:
            return {str(k): datetime.fromisoformat(v) for k, v in body["sessions"].items()}
        except (KeyError, TypeError, AttributeError, ValueError):
            raise DispatchUnavailableError("unexpected revoked-sessions answer") from None

    async def report_audit(self, events: Sequence[dict[str, Any]]) -> None:
        """Post audit events to dispatch's trail.  Raises :class:`DispatchUnavailableError` (the caller retries)."""
        try:
            await self._request("POST", "/api/audit/events", json={"events": list(events)})
        except TimeoutError:
            raise DispatchUnavailableError("timeout") from None
        except httpx.HTTPStatusError as exc:
            raise DispatchUnavailableError(f"http {exc.response.status_code}") from None
        except httpx.HTTPError as exc:
            raise DispatchUnavailableError(type(exc).__name__) from None

    async def forward_auth(self, action: str, body: dict[str, Any], client_addr: str | None = None) -> tuple[int, Any]:
        """Forward a person's ``login``, ``refresh`` or ``logout`` to dispatch: (status, JSON).

        With ``client_addr`` (the person's address) and service credentials, the request carries the board's service
        token and ``X-Forwarded-For: client_addr``, so dispatch throttles sign-ins per person's address and not per
        board (:class:`broker_config.identity.SignInThrottle`).  Without a service token it goes unauthenticated.

        Raises:
            DispatchUnavailableError: not configured, timeout, connection failure, not JSON.
        """
        if action not in ("login", "refresh", "logout"):
            raise ValueError("unknown auth action")
        if self._client is None or self._base_url is None:
            raise DispatchUnavailableError("not configured")
        headers: dict[str, str] = {}
        if client_addr is not None:
            try:
                token = await self._service_token()
            except (TimeoutError, httpx.HTTPError, DispatchUnavailableError):
                token = None  # the person's sign-in still goes through, throttled as the board's
            if token is not None:
                headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": client_addr}
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.post(f"{self._base_url}/api/auth/{action}", json=body, headers=headers)
            return response.status_code, (response.json() if response.content else None)
        except TimeoutError:
            raise DispatchUnavailableError("timeout") from None
        except httpx.HTTPError as exc:
            raise DispatchUnavailableError(type(exc).__name__) from None
        except ValueError:
            raise DispatchUnavailableError("not JSON") from None

    # --- hospitals ------------------------------------------------------------------------------------------------

    async def hospitals(self) -> dict[str, HospitalInfo]:
        """Every hospital dispatch knows, by id (cached; empty or the last good list when dispatch is down)."""
        now_s = time.monotonic()
        cache = self._cache
        if cache is not None and now_s - cache.fetched_at_s < self._cache_s:
            return cache.hospitals
        if self._failed_at_s is not None and now_s - self._failed_at_s < self._retry_after_s:
            return cache.hospitals if cache else {}
        async with self._lock:
            if self._cache is not cache:  # another caller refreshed it meanwhile
                return self._cache.hospitals if self._cache else {}
            try:
                data = await self._get("/api/hospitals")
                if not isinstance(data, list):
                    raise DispatchUnavailableError("not a list")
                hospitals: dict[str, HospitalInfo] = {}
                for item in data:
                    try:
                        info = HospitalInfo.model_validate(item)
                    except ValidationError:
                        continue
                    if info.name.strip():
                        hospitals[info.hospital_id] = info.model_copy(update={"name": info.name.strip()[:200]})
            except DispatchUnavailableError as exc:
                self._failed_at_s = time.monotonic()
                logger.info("hospital list unavailable reason=%s", exc.reason)
                return cache.hospitals if cache else {}
            self._failed_at_s = None
            self._cache = _Cache(hospitals, time.monotonic())
            return hospitals

    async def name(self, hospital_id: str) -> str:
        """The hospital's display name, or its id when dispatch cannot tell."""
        info = (await self.hospitals()).get(hospital_id)
        return info.name if info is not None else hospital_id

    async def position(self, hospital_id: str) -> tuple[float, float] | None:
        """The hospital's (lat, lon) in degrees, or None when unknown."""
        info = (await self.hospitals()).get(hospital_id)
        if info is None or info.lat_deg is None or info.lon_deg is None:
            return None
        return (info.lat_deg, info.lon_deg)

    # --- alerts ------------------------------------------------------------------------------------------------------

    async def open_alerts(self, now_at: datetime, max_age_s: float) -> list[HospitalAlert]:
        """Open alerts to show again after a board restart or reconnect, as contract models.

        Only the newest alert of each unit (a unit carries one patient at a time), not cancelled, created within
        ``max_age_s``.  Findings come from each alert's detail; a detail that fails leaves the findings empty.
        Activations are not in dispatch's API: they arrive with dispatch's next re-publication.

        Raises:
            DispatchUnavailableError: the alert list could not be fetched.
        """
        data = await self._get("/api/alerts")
        if not isinstance(data, list):
            raise DispatchUnavailableError("not a list")
        cutoff = now_at - timedelta(seconds=max_age_s)
        newest: dict[str, _AlertRow] = {}
        for item in data:
            try:
                row = _AlertRow.model_validate(item)
            except ValidationError:
                continue
            known = newest.get(row.unit_id)
            if known is None or row.created_at > known.created_at:
                newest[row.unit_id] = row
        rows = [r for r in newest.values() if r.state is not AlertState.CANCELLED and r.created_at >= cutoff]
        details = await asyncio.gather(*(self._detail(r.alert_id) for r in rows))
        out: list[HospitalAlert] = []
        for row, detail in zip(rows, details, strict=True):
            try:
                for identifier in (row.alert_id, row.unit_id, row.hospital_id):
                    valid_id(identifier)
                out.append(
                    HospitalAlert(
                        unit_id=row.unit_id,
                        seq=0,
                        sent_at=row.created_at,
                        historical=row.historical,
                        alert_id=row.alert_id,
                        hospital_id=row.hospital_id,
                        case_type=row.case_type,
                        priority=row.priority,
                        eta_at=row.eta_at,
                        departments=tuple(row.departments),
                        findings=_findings(detail),
                        reasons=tuple(r[:_REASON_MAX] for r in row.reasons),
                        state=row.state,
                    )
                )
            except (TopicError, ValidationError):
                logger.warning("resync skipped an alert dispatch listed alert=%s", row.alert_id[:40])
        return out

    async def _detail(self, alert_id: str) -> _AlertDetail | None:
        try:
            return _AlertDetail.model_validate(await self._get(f"/api/alerts/{alert_id}"))
        except (DispatchUnavailableError, ValidationError):
            logger.info("alert detail unavailable alert=%s", alert_id[:40])
            return None

    async def timeline(self, alert_id: str) -> list[TimelineItem]:
        """Dispatch's timeline of one alert.  Raises :class:`DispatchUnavailableError`."""
        detail = await self._detail(alert_id)
        if detail is None:
            raise DispatchUnavailableError("no detail")
        return detail.timeline

    # --- routes ------------------------------------------------------------------------------------------------------

    async def route(self, from_deg: tuple[float, float], to_deg: tuple[float, float]) -> RouteInfo:
        """Dispatch's road route between two points.  Raises :class:`DispatchUnavailableError`."""
        params = {"from": f"{from_deg[0]:.6f},{from_deg[1]:.6f}", "to": f"{to_deg[0]:.6f},{to_deg[1]:.6f}"}
        data = await self._get("/api/route", params)
        try:
            return RouteInfo.model_validate(data)
        except ValidationError:
            raise DispatchUnavailableError("bad route") from None


HospitalDirectory = DispatchClient
"""The former name (hospital names were its only use)."""


def _findings(detail: _AlertDetail | None) -> Findings:
    if detail is None:
        return Findings()
    known = {k: v for k, v in detail.findings.items() if k in Findings.model_fields}
    try:
        return Findings.model_validate(known)
    except ValidationError:
        return Findings()
