-- GoldenHour dispatch schema (SQLite 3.35+).  Times are ISO 8601 UTC text; documents are JSON text.
CREATE TABLE dispatch_units (
    unit_id     text PRIMARY KEY,
    doc         TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE TABLE dispatch_alerts (
    alert_id     text PRIMARY KEY,
    unit_id      text NOT NULL,
    incident_id  text,
    hospital_id  text NOT NULL,
    case_type    text NOT NULL,
    priority     text NOT NULL,
    state        text NOT NULL,
    created_at   TEXT NOT NULL,
    doc          TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);
CREATE INDEX dispatch_alerts_created_idx ON dispatch_alerts (created_at);

CREATE TABLE dispatch_alert_events (
    alert_id    text NOT NULL REFERENCES dispatch_alerts (alert_id) ON DELETE CASCADE,
    event_no    integer NOT NULL,
    at          TEXT NOT NULL,
    source      text NOT NULL,
    kind        text NOT NULL,
    detail      text NOT NULL,
    historical  INTEGER NOT NULL,
    PRIMARY KEY (alert_id, event_no)
);

CREATE TABLE dispatch_hospital_status (
    change_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    hospital_id    text NOT NULL,
    set_by         text,
    set_at         TEXT,
    until          TEXT,
    diversion      INTEGER NOT NULL,
    cath_lab_busy  INTEGER NOT NULL,
    ed_beds_free   integer
);
CREATE INDEX dispatch_hospital_status_hospital_idx ON dispatch_hospital_status (hospital_id, change_id);

CREATE TABLE dispatch_incidents (
    incident_id  text PRIMARY KEY,
    state        text NOT NULL,
    priority     text NOT NULL,
    case_type    text,
    unit_id      text,
    lat_deg      REAL NOT NULL,
    lon_deg      REAL NOT NULL,
    created_at   TEXT NOT NULL,
    doc          TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);
CREATE INDEX dispatch_incidents_created_idx ON dispatch_incidents (created_at);

CREATE TABLE dispatch_case_events (
    incident_id     text NOT NULL REFERENCES dispatch_incidents (incident_id) ON DELETE CASCADE,
    event_no        integer NOT NULL,
    point           text NOT NULL,
    at              TEXT NOT NULL,
    source          text NOT NULL,
    recorded_at     TEXT NOT NULL,
    detail          text NOT NULL,
    clock_offset_s  REAL,
    flags           TEXT NOT NULL,
    PRIMARY KEY (incident_id, event_no)
);
CREATE INDEX dispatch_case_events_point_idx ON dispatch_case_events (point, at);
