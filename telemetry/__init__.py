"""GoldenHour telemetry: the MQTT ingest and the telemetry store (SQLite embedded, PostgreSQL in production).

Public surface::

    store = open_store("sqlite:///goldenhour.sqlite3")     # or "postgresql://..."
    await store.migrate()
    await store.write(batch); await store.latest_vitals(); await store.ecg_window("amb12", 10.0) ...
    await run_ingest(database_url, broker_settings, topic_space)   # migrate, then ingest until cancelled
"""

from telemetry.errors import (
    MigrationError,
    StoreUnavailableError,
    TelemetryError,
    UnsupportedStoreError,
    WriteError,
)
from telemetry.ingest import Ingest, IngestStats, RejectReason
from telemetry.migrate import migrate
from telemetry.records import (
    GAP_TRACKED_STREAMS,
    STORED_STREAMS,
    EcgWindow,
    GapInfo,
    GpsPoint,
    IngestState,
    LatestVitals,
    VitalsBin,
    VitalValue,
    WriteResult,
)
from telemetry.service import run_ingest
from telemetry.settings import TelemetrySettings
from telemetry.store import Store, open_store

__all__ = [
    "open_store",
    "migrate",
    "run_ingest",
    "Store",
    "Ingest",
    "IngestStats",
    "RejectReason",
    "TelemetrySettings",
    "WriteResult",
    "LatestVitals",
    "VitalValue",
    "EcgWindow",
    "GpsPoint",
    "VitalsBin",
    "GapInfo",
    "IngestState",
    "STORED_STREAMS",
    "GAP_TRACKED_STREAMS",
    "TelemetryError",
    "StoreUnavailableError",
    "WriteError",
    "MigrationError",
    "UnsupportedStoreError",
]
