-- GoldenHour telemetry store, SQLite (embedded default).  Same tables as PostgreSQL.
-- Times are ISO-8601 UTC text of fixed width ('YYYY-MM-DDTHH:MM:SS.ffffff+00:00'), so they sort as text.
-- Arrays and JSON are JSON text; ECG samples a BLOB of little-endian int16, lead-major.

CREATE TABLE vitals (
    unit_id     TEXT    NOT NULL,
    seq         INTEGER NOT NULL CHECK (seq >= 0),
    loinc       TEXT    NOT NULL,
    mdc_code    INTEGER,
    ucum        TEXT    NOT NULL,
    value       REAL    NOT NULL,
    measured_at TEXT    NOT NULL,
    source      TEXT,
    sent_at     TEXT    NOT NULL,
    received_at TEXT    NOT NULL,
    historical  INTEGER NOT NULL,
    PRIMARY KEY (unit_id, seq, loinc)
) WITHOUT ROWID;
CREATE INDEX vitals_unit_code_time ON vitals (unit_id, loinc, measured_at);

CREATE TABLE ecg_chunk (
    unit_id         TEXT    NOT NULL,
    seq             INTEGER NOT NULL CHECK (seq >= 0),
    start_at        TEXT    NOT NULL,
    fs_hz           REAL    NOT NULL CHECK (fs_hz > 0),
    leads           TEXT    NOT NULL,
    gain_adc_per_mv REAL    NOT NULL CHECK (gain_adc_per_mv > 0),
    baseline_adc    INTEGER NOT NULL,
    n_samples       INTEGER NOT NULL CHECK (n_samples > 0),
    samples         BLOB    NOT NULL,
    lead_off        TEXT    NOT NULL,
    sent_at         TEXT    NOT NULL,
    received_at     TEXT    NOT NULL,
    historical      INTEGER NOT NULL,
    PRIMARY KEY (unit_id, seq)
);
CREATE INDEX ecg_chunk_unit_time ON ecg_chunk (unit_id, start_at);

CREATE TABLE gps_fix (
    unit_id       TEXT    NOT NULL,
    seq           INTEGER NOT NULL CHECK (seq >= 0),
    fix           INTEGER NOT NULL,
    lat_deg       REAL CHECK (lat_deg BETWEEN -90 AND 90),
    lon_deg       REAL CHECK (lon_deg BETWEEN -180 AND 180),
    speed_mps     REAL,
    heading_deg   REAL,
    hdop          REAL,
    fix_quality   INTEGER,
    device_time   TEXT,
    clock_suspect INTEGER NOT NULL,
    sent_at       TEXT    NOT NULL,
    received_at   TEXT    NOT NULL,
    historical    INTEGER NOT NULL,
    PRIMARY KEY (unit_id, seq),
    CHECK (fix = (lat_deg IS NOT NULL AND lon_deg IS NOT NULL))
) WITHOUT ROWID;
CREATE INDEX gps_fix_unit_time ON gps_fix (unit_id, received_at);

CREATE TABLE unit_status (
    unit_id                 TEXT    NOT NULL,
    seq                     INTEGER NOT NULL CHECK (seq >= 0),
    status                  TEXT    NOT NULL,
    at                      TEXT    NOT NULL,
    incident_id             TEXT,
    destination_hospital_id TEXT,
    sent_at                 TEXT    NOT NULL,
    received_at             TEXT    NOT NULL,
    historical              INTEGER NOT NULL,
    PRIMARY KEY (unit_id, seq)
) WITHOUT ROWID;

CREATE TABLE availability (
    unit_id     TEXT    NOT NULL,
    seq         INTEGER NOT NULL CHECK (seq >= 0),
    state       TEXT    NOT NULL CHECK (state IN ('online', 'offline')),
    sent_at     TEXT    NOT NULL,
    received_at TEXT    NOT NULL,
    historical  INTEGER NOT NULL,
    PRIMARY KEY (unit_id, seq, state)
) WITHOUT ROWID;

CREATE TABLE prealert (
    unit_id               TEXT    NOT NULL,
    seq                   INTEGER NOT NULL CHECK (seq >= 0),
    alert_id              TEXT    NOT NULL,
    case_type             TEXT    NOT NULL,
    eta_s                 INTEGER,
    requested_hospital_id TEXT,
    findings              TEXT    NOT NULL,
    sent_at               TEXT    NOT NULL,
    received_at           TEXT    NOT NULL,
    historical            INTEGER NOT NULL,
    PRIMARY KEY (unit_id, seq)
) WITHOUT ROWID;
CREATE INDEX prealert_alert ON prealert (alert_id);

CREATE TABLE telemetry_gap (
    unit_id     TEXT    NOT NULL,
    seq         INTEGER NOT NULL CHECK (seq >= 0),
    stream      TEXT    NOT NULL,
    from_seq    INTEGER NOT NULL CHECK (from_seq >= 0),
    to_seq      INTEGER NOT NULL CHECK (to_seq >= from_seq),
    detected_at TEXT    NOT NULL,
    sent_at     TEXT    NOT NULL,
    received_at TEXT    NOT NULL,
    historical  INTEGER NOT NULL,
    PRIMARY KEY (unit_id, seq),
    UNIQUE (unit_id, stream, from_seq)
) WITHOUT ROWID;
