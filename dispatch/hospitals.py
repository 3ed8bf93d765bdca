"""Hospital registry: OSM hospital objects, cleaned of tagging noise, merged with capabilities and live status.

Pipeline::

    read_osm_hospitals(csv)  ->  clean_osm_hospitals(rows)  ->  merge with hospital_capabilities.json
                             ->  HospitalRegistry (+ live status: diversion, cath lab busy, free ED beds)

OpenStreetMap's ``amenity=hospital`` is tagged by volunteers; the shipped extracts contain historical buildings,
outpatient centres, a pharmacy, objects tagged ``emergency=no`` and the same hospital twice (node and campus
outline, or an unnamed outline next to the named node).  :data:`CLEANING_RULES` lists each rule with its reason;
:func:`clean_osm_hospitals` applies them in order and reports every drop (OSM wiki, ``Tag:amenity=hospital``:
"for outpatient-only facilities use amenity=clinic"; ``Key:emergency``).

Capabilities (24/7 PCI, stroke unit, thrombectomy, trauma level, ED) come from
``data/hospital_capabilities.json``; for the demo regions they are **assumptions**, not real-world facts.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from dispatch.errors import RegistryError, UnknownHospitalError
from dispatch.geo import haversine_m

__all__ = [
    "DATA_DIR",
    "CLEANING_RULES",
    "Capabilities",
    "CleaningReport",
    "DropRule",
    "Hospital",
    "HospitalRegistry",
    "HospitalSnapshot",
    "HospitalStatus",
    "OsmHospital",
    "clean_osm_hospitals",
    "read_osm_hospitals",
]

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
"""The map and hospital files shipped with the package."""

UNNAMED_DUPLICATE_RADIUS_M = 500.0
"""An unnamed hospital object this close to a named one is taken as part of it (outline, entrance, building)."""
NAMED_DUPLICATE_RADIUS_M = 1_000.0
"""Two objects with the same name this close are one hospital tagged twice (node and campus way)."""


# --- raw OSM rows and the cleaning table -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OsmHospital:
    """One object tagged as a hospital in an OSM extract.  ``osm_ref`` is ``"node/123"`` or ``"way/456"``."""

    osm_ref: str
    name: str
    lat_deg: float
    lon_deg: float
    amenity: str = ""
    healthcare: str = ""
    emergency: str = ""

    @property
    def position_deg(self) -> tuple[float, float]:
        """(lat, lon) in degrees."""
        return (self.lat_deg, self.lon_deg)


_OSM_TYPE_LETTERS = {"n": "node", "w": "way", "r": "relation"}


def _osm_ref(row: dict[str, str]) -> str:
    raw = (row.get("osm_id") or "").strip()
    osm_type = (row.get("osm_type") or "").strip()
    if osm_type:
        return f"{osm_type}/{raw}"
    if raw[:1] in _OSM_TYPE_LETTERS and raw[1:].isdigit():
        return f"{_OSM_TYPE_LETTERS[raw[0]]}/{raw[1:]}"
    raise ValueError("osm_id without a type")


def read_osm_hospitals(path: Path) -> list[OsmHospital]:
    """Read a hospital CSV derived from an OSM extract.

    Accepts both shipped layouts: ``osm_type,osm_id,...`` (Monaco) and ``osm_id`` with a type letter such as
    ``n358245093`` / ``w85609491`` (Baltimore).  Needs columns ``name, lat, lon``; ``amenity``,
    ``healthcare`` and ``emergency`` are optional.

    Raises:
        RegistryError: a missing column, a row without a usable id or coordinates.
    """
    rows: list[OsmHospital] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"osm_id", "name", "lat", "lon"} - set(reader.fieldnames or ())
        if missing:
            raise RegistryError(str(path), f"missing columns {sorted(missing)}")
        for line_no, row in enumerate(reader, start=2):
            try:
                rows.append(
                    OsmHospital(
                        osm_ref=_osm_ref(row),
                        name=(row.get("name") or "").strip(),
                        lat_deg=float(row["lat"]),
                        lon_deg=float(row["lon"]),
                        amenity=(row.get("amenity") or "").strip(),
                        healthcare=(row.get("healthcare") or "").strip(),
                        emergency=(row.get("emergency") or "").strip().lower(),
                    )
                )
            except (ValueError, KeyError):
                raise RegistryError(str(path), f"row {line_no} has no usable id or coordinates") from None
    return rows


@dataclass(frozen=True, slots=True)
class DropRule:
    """One cleaning rule: ``applies(row, kept_so_far)`` says whether to drop ``row``; ``reason`` explains why."""

    rule_id: str
    reason: str
    applies: Callable[[OsmHospital, Sequence[OsmHospital]], bool]


def _name_matches(pattern: str) -> Callable[[OsmHospital, Sequence[OsmHospital]], bool]:
    regex = re.compile(pattern, re.IGNORECASE)
    return lambda row, _kept: bool(regex.search(row.name))


def _unnamed_near_named(row: OsmHospital, kept: Sequence[OsmHospital]) -> bool:
    return not row.name and any(
        k.name and haversine_m(row.position_deg, k.position_deg) <= UNNAMED_DUPLICATE_RADIUS_M for k in kept
    )


def _same_name_nearby(row: OsmHospital, kept: Sequence[OsmHospital]) -> bool:
    return bool(row.name) and any(
        k.name.casefold() == row.name.casefold()
        and haversine_m(row.position_deg, k.position_deg) <= NAMED_DUPLICATE_RADIUS_M
        for k in kept
    )


CLEANING_RULES: tuple[DropRule, ...] = (
    DropRule(
        "historical",
        "historical object: the name marks it '(historical)', it no longer operates as a hospital",
        _name_matches(r"\(historical\)|\bformer\b|\bdisused\b"),
    ),
    DropRule(
        "pharmacy",
        "a pharmacy mis-tagged amenity=hospital: no beds, no emergency department",
        _name_matches(r"pharmac|farmac|apotheke"),
    ),
    DropRule(
        "outpatient",
        "outpatient or family-care centre (OSM: amenity=clinic): no inpatient care, no emergency department",
        _name_matches(r"outpatient|family\s*care"),
    ),
    DropRule(
        "emergency_no",
        "tagged emergency=no: does not receive emergency patients",
        lambda row, _kept: row.emergency == "no",
    ),
    DropRule(
        "named_duplicate",
        f"same name as a hospital already kept within {NAMED_DUPLICATE_RADIUS_M:.0f} m: one hospital tagged twice",
        _same_name_nearby,
    ),
    DropRule(
        "unnamed_duplicate",
        f"unnamed object within {UNNAMED_DUPLICATE_RADIUS_M:.0f} m of a named hospital: part of that hospital",
        _unnamed_near_named,
    ),
)
"""The cleaning rules, applied in this order; the first rule that applies drops the row."""


@dataclass(frozen=True, slots=True)
class CleaningReport:
    """What :func:`clean_osm_hospitals` kept and what it dropped, with the rule for each drop."""

    kept: tuple[OsmHospital, ...]
    dropped: tuple[tuple[OsmHospital, DropRule], ...]

    def dropped_by_rule(self) -> dict[str, list[str]]:
        """``{rule_id: [osm_ref, ...]}`` of the dropped rows."""
        out: dict[str, list[str]] = {}
        for row, rule in self.dropped:
            out.setdefault(rule.rule_id, []).append(row.osm_ref)
        return out


def clean_osm_hospitals(rows: Iterable[OsmHospital], rules: Sequence[DropRule] = CLEANING_RULES) -> CleaningReport:
    """Drop tagging noise from OSM hospital rows by the table of ``rules``.

    Ways (campus outlines) are considered before nodes and named objects before unnamed ones, so that of two
    objects describing one hospital the more complete survives.  Duplicate rules compare against rows already kept.
    """
    ordered = sorted(rows, key=lambda r: (not r.name, not r.osm_ref.startswith("way/"), r.osm_ref))
    kept: list[OsmHospital] = []
    dropped: list[tuple[OsmHospital, DropRule]] = []
    for row in ordered:
        rule = next((r for r in rules if r.applies(row, kept)), None)
        if rule is None:
            kept.append(row)
        else:
            dropped.append((row, rule))
    return CleaningReport(tuple(kept), tuple(dropped))


# --- merged registry -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a hospital can do, as far as the destination rules care (DOMAIN.md section 5).

    ``trauma_level`` follows the ACS verification levels: 1 is the highest; ``None`` means not a trauma centre.
    """

    ed: bool
    pci_24_7: bool = False
    stroke_unit: bool = False
    thrombectomy: bool = False
    trauma_level: int | None = None


@dataclass(frozen=True, slots=True)
class Hospital:
    """A cleaned hospital with its opaque id, display name, position and capabilities."""

    hospital_id: str
    name: str
    lat_deg: float
    lon_deg: float
    capabilities: Capabilities
    osm_ref: str = ""
    region: str = ""

    @property
    def position_deg(self) -> tuple[float, float]:
        """(lat, lon) in degrees."""
        return (self.lat_deg, self.lon_deg)


@dataclass(frozen=True, slots=True)
class HospitalStatus:
    """Live status of a hospital, set by a person through the API.

    ``diversion``: the ED turns ambulances away.  ``cath_lab_busy``: no cath lab free now.  ``ed_beds_free``:
    free ED treatment spaces (``None`` = not reported).  ``set_by`` / ``set_at`` record who and when (UTC);
    after ``until`` (UTC) the status lapses back to normal on its own.
    """

    diversion: bool = False
    cath_lab_busy: bool = False
    ed_beds_free: int | None = None
    set_by: str | None = None
    set_at: datetime | None = None
    until: datetime | None = None

    def effective(self, now: datetime) -> HospitalStatus:
        """The status in force at ``now``: this one, or the normal status once ``until`` has passed."""
        if self.until is not None and now >= self.until:
            return HospitalStatus()
        return self


@dataclass(frozen=True, slots=True)
class HospitalSnapshot:
    """A hospital with its status at one instant: the destination engine's input."""

    hospital: Hospital
    status: HospitalStatus = field(default_factory=HospitalStatus)


def _capabilities(raw: dict[str, object], path: Path, ref: str) -> Capabilities:
    level = raw.get("trauma_level")
    if level is not None and (not isinstance(level, int) or not 1 <= level <= 5):
        raise RegistryError(str(path), f"{ref}: trauma_level must be 1-5 or null")
    flags = {}
    for key in ("ed", "pci_24_7", "stroke_unit", "thrombectomy"):
        value = raw.get(key, False)
        if not isinstance(value, bool):
            raise RegistryError(str(path), f"{ref}: {key} must be true or false")
        flags[key] = value
    return Capabilities(trauma_level=level, **flags)


class HospitalRegistry:
    """The hospitals of a region with their live status.  Thread-safe for status changes.

    Raises:
        UnknownHospitalError: from :meth:`get` and :meth:`set_status` for an id not in the registry.
    """

    def __init__(self, hospitals: Iterable[Hospital], cleaning: CleaningReport | None = None) -> None:
        self._hospitals = {h.hospital_id: h for h in hospitals}
        self._status: dict[str, HospitalStatus] = {}
        self._lock = threading.Lock()
        self.cleaning = cleaning

    @classmethod
    def load(
        cls,
        csv_paths: Sequence[Path] = (DATA_DIR / "monaco_hospitals.csv",),
        capabilities_path: Path = DATA_DIR / "hospital_capabilities.json",
    ) -> HospitalRegistry:
        """Read, clean and merge the OSM CSVs with the capabilities file.

        Raises:
            RegistryError: unreadable files, a kept hospital without a capabilities entry, duplicate ids.
        """
        rows = [row for p in csv_paths for row in read_osm_hospitals(p)]
        report = clean_osm_hospitals(rows)
        for row, rule in report.dropped:
            logger.debug("hospital dropped osm=%s rule=%s", row.osm_ref, rule.rule_id)
        try:
            doc = json.loads(capabilities_path.read_text(encoding="utf-8"))
            entries = {e["osm_ref"]: e for e in doc["hospitals"]}
        except (OSError, ValueError, KeyError, TypeError):
            raise RegistryError(str(capabilities_path), "unreadable capabilities file") from None
        hospitals: list[Hospital] = []
        for row in report.kept:
            entry = entries.get(row.osm_ref)
            if entry is None:
                raise RegistryError(str(capabilities_path), f"no capabilities for kept hospital {row.osm_ref}")
            try:
                hospital_id = str(entry["hospital_id"])
                name = str(entry.get("name") or row.name)
                caps = _capabilities(dict(entry["capabilities"]), capabilities_path, row.osm_ref)
            except (KeyError, TypeError, ValueError):
                raise RegistryError(str(capabilities_path), f"malformed entry for {row.osm_ref}") from None
            hospitals.append(
                Hospital(hospital_id, name, row.lat_deg, row.lon_deg, caps, row.osm_ref, str(entry.get("region", "")))
            )
        ids = [h.hospital_id for h in hospitals]
        if len(set(ids)) != len(ids):
            raise RegistryError(str(capabilities_path), "duplicate hospital ids")
        return cls(hospitals, cleaning=report)

    def hospitals(self) -> list[Hospital]:
        """Every hospital, in id order."""
        return [self._hospitals[k] for k in sorted(self._hospitals)]

    def get(self, hospital_id: str) -> Hospital:
        """The hospital with this id.  Raises UnknownHospitalError."""
        try:
            return self._hospitals[hospital_id]
        except KeyError:
            raise UnknownHospitalError(hospital_id) from None

    def __contains__(self, hospital_id: object) -> bool:
        return hospital_id in self._hospitals

    def status(self, hospital_id: str, now: datetime) -> HospitalStatus:
        """The status in force at ``now`` (UTC).  Raises UnknownHospitalError."""
        self.get(hospital_id)
        with self._lock:
            return self._status.get(hospital_id, HospitalStatus()).effective(now)

    def set_status(
        self,
        hospital_id: str,
        *,
        by: str,
        at: datetime,
        diversion: bool | None = None,
        cath_lab_busy: bool | None = None,
        ed_beds_free: int | None = None,
        until: datetime | None = None,
    ) -> HospitalStatus:
        """Change a hospital's status; fields left ``None`` keep their current value.

        ``by`` is the person or role (recorded, never logged), ``at`` and ``until`` are UTC.  Returns the new status.
        Raises UnknownHospitalError.
        """
        self.get(hospital_id)
        with self._lock:
            current = self._status.get(hospital_id, HospitalStatus()).effective(at)
            new = replace(
                current,
                diversion=current.diversion if diversion is None else diversion,
                cath_lab_busy=current.cath_lab_busy if cath_lab_busy is None else cath_lab_busy,
                ed_beds_free=current.ed_beds_free if ed_beds_free is None else ed_beds_free,
                set_by=by,
                set_at=at,
                until=until,
            )
            self._status[hospital_id] = new
        logger.info("hospital status changed hospital=%s", hospital_id)
        return new

    def restore_status(self, hospital_id: str, status: HospitalStatus) -> None:
        """Put back a status loaded from the store (no new change is recorded).  Raises UnknownHospitalError."""
        self.get(hospital_id)
        with self._lock:
            self._status[hospital_id] = status

    def snapshot(self, now: datetime) -> list[HospitalSnapshot]:
        """Every hospital with the status in force at ``now``."""
        return [HospitalSnapshot(h, self.status(h.hospital_id, now)) for h in self.hospitals()]
