-- GoldenHour dispatch schema (PostgreSQL 15).  Times are timestamptz (UTC sessions); documents are jsonb.
CREATE TABLE dispatch_units (
    unit_id     text PRIMARY KEY,
    doc         jsonb NOT NULL,
    updated_at  timestamptz NOT NULL
);

CREATE TABLE dispatch_alerts (
    alert_id     text PRIMARY KEY,
    unit_id      text NOT NULL,
    incident_id  text,
    hospital_id  text NOT NULL,
    case_type    text NOT NULL,
    priority     text NOT NULL,
    state        text NOT NULL,
    created_at   timestamptz NOT NULL,
    doc          jsonb NOT NULL,
    updated_at   timestamptz NOT NULL
);
CREATE INDEX dispatch_alerts_created_idx ON dispatch_alerts (created_at);

CREATE TABLE dispatch_alert_events (
    alert_id    text NOT NULL REFERENCES dispatch_alerts (alert_id) ON DELETE CASCADE,
    event_no    integer NOT NULL,
    at          timestamptz NOT NULL,
    source      text NOT NULL,
    kind        text NOT NULL,
    detail      text NOT NULL,
    historical  boolean NOT NULL,
    PRIMARY KEY (alert_id, event_no)
);

CREATE TABLE dispatch_hospital_status (
    change_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hospital_id    text NOT NULL,
    set_by         text,
    set_at         timestamptz,
    until          timestamptz,
    diversion      boolean NOT NULL,
    cath_lab_busy  boolean NOT NULL,
    ed_beds_free   integer
);
CREATE INDEX dispatch_hospital_status_hospital_idx ON dispatch_hospital_status (hospital_id, change_id);

CREATE TABLE dispatch_incidents (
    incident_id  text PRIMARY KEY,
    state        text NOT NULL,
    priority     text NOT NULL,
    case_type    text,
    unit_id      text,
    lat_deg      double precision NOT NULL,
    lon_deg      double precision NOT NULL,
    created_at   timestamptz NOT NULL,
    doc          jsonb NOT NULL,
    updated_at   timestamptz NOT NULL
);
CREATE INDEX dispatch_incidents_created_idx ON dispatch_incidents (created_at);

CREATE TABLE dispatch_case_events (
    incident_id     text NOT NULL REFERENCES dispatch_incidents (incident_id) ON DELETE CASCADE,
    event_no        integer NOT NULL,
    point           text NOT NULL,
    at              timestamptz NOT NULL,
    source          text NOT NULL,
    recorded_at     timestamptz NOT NULL,
    detail          text NOT NULL,
    clock_offset_s  double precision,
    flags           jsonb NOT NULL,
    PRIMARY KEY (incident_id, event_no)
);
CREATE INDEX dispatch_case_events_point_idx ON dispatch_case_events (point, at);
