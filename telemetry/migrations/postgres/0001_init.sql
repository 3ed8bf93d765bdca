-- GoldenHour telemetry store, PostgreSQL 15 (stock; TimescaleDB optional and not assumed).
-- Every table is keyed by its message key so that a redelivered or replayed message is a no-op
-- (INSERT ... ON CONFLICT DO NOTHING).  Times are timestamptz; the ingest session runs with TimeZone=UTC.

CREATE TABLE vitals (
    unit_id     text             NOT NULL,
    seq         bigint           NOT NULL CHECK (seq >= 0),
    loinc       text             NOT NULL,
    mdc_code    integer,
    ucum        text             NOT NULL,
    value       double precision NOT NULL,
    measured_at timestamptz      NOT NULL,
    source      text,
    sent_at     timestamptz      NOT NULL,
    received_at timestamptz      NOT NULL,
    historical  boolean          NOT NULL,
    PRIMARY KEY (unit_id, seq, loinc)
);
CREATE INDEX vitals_unit_code_time ON vitals (unit_id, loinc, measured_at DESC);

CREATE TABLE ecg_chunk (
    unit_id         text             NOT NULL,
    seq             bigint           NOT NULL CHECK (seq >= 0),
    start_at        timestamptz      NOT NULL,
    fs_hz           double precision NOT NULL CHECK (fs_hz > 0),
    leads           text[]           NOT NULL,
    gain_adc_per_mv double precision NOT NULL CHECK (gain_adc_per_mv > 0),
    baseline_adc    integer          NOT NULL,
    n_samples       integer          NOT NULL CHECK (n_samples > 0),
    samples         bytea            NOT NULL,  -- little-endian int16, lead-major (n_leads, n_samples)
    lead_off        boolean[]        NOT NULL,
    sent_at         timestamptz      NOT NULL,
    received_at     timestamptz      NOT NULL,
    historical      boolean          NOT NULL,
    PRIMARY KEY (unit_id, seq),
    CHECK (octet_length(samples) = 2 * n_samples * cardinality(leads))
);
CREATE INDEX ecg_chunk_unit_time ON ecg_chunk (unit_id, start_at DESC);

CREATE TABLE gps_fix (
    unit_id       text             NOT NULL,
    seq           bigint           NOT NULL CHECK (seq >= 0),
    fix           boolean          NOT NULL,
    lat_deg       double precision CHECK (lat_deg BETWEEN -90 AND 90),
    lon_deg       double precision CHECK (lon_deg BETWEEN -180 AND 180),
    speed_mps     double precision,
    heading_deg   double precision,
    hdop          double precision,
    fix_quality   smallint,
    device_time   timestamptz,
    clock_suspect boolean          NOT NULL,
    sent_at       timestamptz      NOT NULL,
    received_at   timestamptz      NOT NULL,
    historical    boolean          NOT NULL,
    PRIMARY KEY (unit_id, seq),
    CHECK (fix = (lat_deg IS NOT NULL AND lon_deg IS NOT NULL))
);
CREATE INDEX gps_fix_unit_time ON gps_fix (unit_id, received_at);

CREATE TABLE unit_status (
    unit_id                 text        NOT NULL,
    seq                     bigint      NOT NULL CHECK (seq >= 0),
    status                  text        NOT NULL,
    at                      timestamptz NOT NULL,
    incident_id             text,
    destination_hospital_id text,
    sent_at                 timestamptz NOT NULL,
    received_at             timestamptz NOT NULL,
    historical              boolean     NOT NULL,
    PRIMARY KEY (unit_id, seq)
);

CREATE TABLE availability (
    unit_id     text        NOT NULL,
    seq         bigint      NOT NULL CHECK (seq >= 0),  -- the unit's session number (Sparkplug bdSeq)
    state       text        NOT NULL CHECK (state IN ('online', 'offline')),
    sent_at     timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    historical  boolean     NOT NULL,
    PRIMARY KEY (unit_id, seq, state)
);

CREATE TABLE prealert (
    unit_id               text        NOT NULL,
    seq                   bigint      NOT NULL CHECK (seq >= 0),
    alert_id              text        NOT NULL,
    case_type             text        NOT NULL,
    eta_s                 integer,
    requested_hospital_id text,
    findings              jsonb       NOT NULL,
    sent_at               timestamptz NOT NULL,
    received_at           timestamptz NOT NULL,
    historical            boolean     NOT NULL,
    PRIMARY KEY (unit_id, seq)
);
CREATE INDEX prealert_alert ON prealert (alert_id);

CREATE TABLE telemetry_gap (
    unit_id     text        NOT NULL,
    seq         bigint      NOT NULL CHECK (seq >= 0),  -- the GapRecord's own seq on the gap stream
    stream      text        NOT NULL,
    from_seq    bigint      NOT NULL CHECK (from_seq >= 0),
    to_seq      bigint      NOT NULL CHECK (to_seq >= from_seq),
    detected_at timestamptz NOT NULL,
    sent_at     timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    historical  boolean     NOT NULL,
    PRIMARY KEY (unit_id, seq),
    UNIQUE (unit_id, stream, from_seq)
);
