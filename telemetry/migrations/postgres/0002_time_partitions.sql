-- 0002: time partitioning and retention of the big tables (ECG chunks, vitals, GPS), compact ECG, latest-vitals
-- and stream-head tables.  Existing databases migrate forward: the 0001 rows are copied into the new tables.
--
-- Partition key = a time that is deterministic from the payload, so that a redelivered message lands in the same
-- partition and hits the same unique key (a duplicate stays a no-op):
--   ecg_chunk.start_at (first sample), vitals.measured_at, gps_fix.sent_at (the envelope; device_time is optional
--   and untrusted, FF-07).  Unique keys are the message key plus the partition key.
--
-- Two storage modes, recorded in telemetry_storage:
--   'timescaledb': the extension is available and preloaded -> hypertables, compression and retention policies
--                  and a continuous aggregate of per-minute vitals (vitals_1min).
--   'native'     : stock PostgreSQL (CI, development) -> declarative RANGE partitions, one per partition_width,
--                  created ahead and dropped when wholly older than the stream's retention by
--                  telemetry_maintain(now) (telemetry.maintenance.run), and created on demand by the writer for
--                  late data that is still within retention.

CREATE TABLE telemetry_retention (
    stream          text     PRIMARY KEY CHECK (stream IN ('ecg', 'vitals', 'gps')),
    table_name      text     NOT NULL UNIQUE,
    time_column     text     NOT NULL,
    retain          interval NOT NULL CHECK (retain > interval '0'),
    partition_width interval NOT NULL CHECK (partition_width >= interval '1 hour'),
    premake         interval NOT NULL CHECK (premake >= interval '0')
);
COMMENT ON TABLE telemetry_retention IS
    'Per stream: keep data for retain; partitions of partition_width; create partitions premake ahead of now.';
INSERT INTO telemetry_retention VALUES
    ('ecg', 'ecg_chunk', 'start_at', interval '30 days', interval '1 day', interval '2 days'),
    ('vitals', 'vitals', 'measured_at', interval '365 days', interval '1 day', interval '2 days'),
    ('gps', 'gps_fix', 'sent_at', interval '365 days', interval '1 day', interval '2 days');

CREATE TABLE telemetry_partition (
    table_name     text        NOT NULL,
    partition_name text        PRIMARY KEY,
    lower_bound    timestamptz NOT NULL,
    upper_bound    timestamptz NOT NULL CHECK (upper_bound > lower_bound),
    UNIQUE (table_name, lower_bound)
);

CREATE TABLE telemetry_storage (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    mode      text    NOT NULL CHECK (mode IN ('native', 'timescaledb'))
);

-- Keep the 0001 tables aside; their rows are copied at the end.
ALTER TABLE vitals RENAME TO vitals_0001;
ALTER TABLE vitals_0001 RENAME CONSTRAINT vitals_pkey TO vitals_0001_pkey;
ALTER INDEX vitals_unit_code_time RENAME TO vitals_0001_unit_code_time;
ALTER TABLE ecg_chunk RENAME TO ecg_chunk_0001;
ALTER TABLE ecg_chunk_0001 RENAME CONSTRAINT ecg_chunk_pkey TO ecg_chunk_0001_pkey;
ALTER INDEX ecg_chunk_unit_time RENAME TO ecg_chunk_0001_unit_time;
ALTER TABLE gps_fix RENAME TO gps_fix_0001;
ALTER TABLE gps_fix_0001 RENAME CONSTRAINT gps_fix_pkey TO gps_fix_0001_pkey;
ALTER INDEX gps_fix_unit_time RENAME TO gps_fix_0001_unit_time;

-- The new tables, created by a function so that the same DDL serves both modes.
CREATE FUNCTION telemetry_create_tables(p_partitioned boolean) RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    part_v text := CASE WHEN p_partitioned THEN ' PARTITION BY RANGE (measured_at)' ELSE '' END;
    part_e text := CASE WHEN p_partitioned THEN ' PARTITION BY RANGE (start_at)' ELSE '' END;
    part_g text := CASE WHEN p_partitioned THEN ' PARTITION BY RANGE (sent_at)' ELSE '' END;
BEGIN
    EXECUTE $ddl$
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
        PRIMARY KEY (unit_id, seq, loinc, measured_at)
    )$ddl$ || part_v;
    CREATE INDEX vitals_unit_code_time ON vitals (unit_id, loinc, measured_at DESC);

    -- ECG: the samples are kept exactly as the GHE1 message's lossless delta-zlib encoding (broker_config.codec),
    -- about 1 byte per sample instead of 2; rows migrated from 0001 keep their raw int16 bytes in samples.
    EXECUTE $ddl$
    CREATE TABLE ecg_chunk (
        unit_id         text             NOT NULL,
        seq             bigint           NOT NULL CHECK (seq >= 0),
        start_at        timestamptz      NOT NULL,
        end_at          timestamptz      NOT NULL,
        fs_hz           double precision NOT NULL CHECK (fs_hz > 0),
        leads           text[]           NOT NULL,
        gain_adc_per_mv double precision NOT NULL CHECK (gain_adc_per_mv > 0),
        baseline_adc    integer          NOT NULL,
        n_samples       integer          NOT NULL CHECK (n_samples > 0),
        samples         bytea,
        ghe1            bytea,
        lead_off        boolean[]        NOT NULL,
        sent_at         timestamptz      NOT NULL,
        received_at     timestamptz      NOT NULL,
        historical      boolean          NOT NULL,
        PRIMARY KEY (unit_id, seq, start_at),
        CHECK (num_nonnulls(samples, ghe1) = 1),
        CHECK (samples IS NULL OR octet_length(samples) = 2 * n_samples * cardinality(leads)),
        CHECK (end_at > start_at)
    )$ddl$ || part_e;
    -- already compressed: never let TOAST try pglz on it again
    ALTER TABLE ecg_chunk ALTER COLUMN ghe1 SET STORAGE EXTERNAL;
    CREATE INDEX ecg_chunk_unit_end ON ecg_chunk (unit_id, end_at DESC);

    EXECUTE $ddl$
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
        PRIMARY KEY (unit_id, seq, sent_at),
        CHECK (fix = (lat_deg IS NOT NULL AND lon_deg IS NOT NULL))
    )$ddl$ || part_g;
    CREATE INDEX gps_fix_unit_time ON gps_fix (unit_id, received_at);
END
$fn$;

-- Creates (if missing) the partition of p_table that holds p_at; returns its name (NULL in TimescaleDB mode).
-- Run it in its own short transaction: attaching a partition locks the parent table.
CREATE FUNCTION telemetry_ensure_partition(p_table text, p_at timestamptz) RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    width interval;
    lo    timestamptz;
    part_name text;
BEGIN
    IF (SELECT mode FROM telemetry_storage) <> 'native' THEN
        RETURN NULL;
    END IF;
    SELECT partition_width INTO width FROM telemetry_retention WHERE table_name = p_table;
    IF width IS NULL THEN
        RAISE EXCEPTION 'not a partitioned telemetry table: %', p_table USING ERRCODE = 'invalid_parameter_value';
    END IF;
    lo := date_bin(width, p_at, TIMESTAMPTZ '2000-01-01 00:00:00+00');
    part_name := p_table || '_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDD"T"HH24MI');
    IF EXISTS (SELECT 1 FROM telemetry_partition WHERE partition_name = part_name) THEN
        RETURN part_name;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('telemetry_partition'), hashtext(part_name));
    IF NOT EXISTS (SELECT 1 FROM telemetry_partition WHERE partition_name = part_name) THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)', part_name, p_table,
                       to_char(lo AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00',
                       to_char((lo + width) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00');
        IF p_table = 'ecg_chunk' THEN
            EXECUTE format('ALTER TABLE %I ALTER COLUMN ghe1 SET STORAGE EXTERNAL', part_name);
        END IF;
        INSERT INTO telemetry_partition VALUES (p_table, part_name, lo, lo + width);
    END IF;
    RETURN part_name;
END
$fn$;

-- Maintenance at time p_now: create every partition from p_now to p_now + premake, drop every partition wholly
-- older than p_now - retain.  Returns one row per action.  Retention is enforced per partition: a partition
-- goes when its newest possible row has expired, so at most one partition_width of older data remains readable.
CREATE FUNCTION telemetry_maintain(p_now timestamptz)
RETURNS TABLE (action text, table_name text, partition_name text) LANGUAGE plpgsql AS $fn$
DECLARE
    r   record;
    p   record;
    at_ timestamptz;
    made text;
BEGIN
    IF (SELECT mode FROM telemetry_storage) <> 'native' THEN
        RETURN;  -- TimescaleDB's own retention and compression policies do the work
    END IF;
    FOR r IN SELECT * FROM telemetry_retention ORDER BY stream LOOP
        at_ := date_bin(r.partition_width, p_now, TIMESTAMPTZ '2000-01-01 00:00:00+00');
        WHILE at_ <= p_now + r.premake LOOP
            IF NOT EXISTS (SELECT 1 FROM telemetry_partition tp
                           WHERE tp.table_name = r.table_name AND tp.lower_bound <= at_ AND tp.upper_bound > at_) THEN
                made := telemetry_ensure_partition(r.table_name, at_);
                action := 'created'; table_name := r.table_name; partition_name := made;
                RETURN NEXT;
            END IF;
            at_ := at_ + r.partition_width;
        END LOOP;
        FOR p IN SELECT tp.partition_name FROM telemetry_partition tp
                 WHERE tp.table_name = r.table_name AND tp.upper_bound <= p_now - r.retain
                 ORDER BY tp.lower_bound LOOP
            EXECUTE format('DROP TABLE IF EXISTS %I', p.partition_name);
            DELETE FROM telemetry_partition tp WHERE tp.partition_name = p.partition_name;
            action := 'dropped'; table_name := r.table_name; partition_name := p.partition_name;
            RETURN NEXT;
        END LOOP;
    END LOOP;
END
$fn$;

DO $do$
DECLARE
    timescale boolean := EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
                         AND current_setting('shared_preload_libraries') LIKE '%timescaledb%';
BEGIN
    IF timescale THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        INSERT INTO telemetry_storage (mode) VALUES ('timescaledb');
        PERFORM telemetry_create_tables(false);
        PERFORM create_hypertable('ecg_chunk', 'start_at', chunk_time_interval => interval '1 day');
        PERFORM create_hypertable('vitals', 'measured_at', chunk_time_interval => interval '1 day');
        PERFORM create_hypertable('gps_fix', 'sent_at', chunk_time_interval => interval '1 day');
        EXECUTE 'ALTER TABLE ecg_chunk SET (timescaledb.compress, timescaledb.compress_segmentby = ''unit_id'','
                ' timescaledb.compress_orderby = ''seq, start_at'')';
        EXECUTE 'ALTER TABLE vitals SET (timescaledb.compress, timescaledb.compress_segmentby = ''unit_id, loinc'','
                ' timescaledb.compress_orderby = ''measured_at, seq'')';
        EXECUTE 'ALTER TABLE gps_fix SET (timescaledb.compress, timescaledb.compress_segmentby = ''unit_id'','
                ' timescaledb.compress_orderby = ''seq, sent_at'')';
        PERFORM add_compression_policy('ecg_chunk', interval '2 days');
        PERFORM add_compression_policy('vitals', interval '2 days');
        PERFORM add_compression_policy('gps_fix', interval '2 days');
        PERFORM add_retention_policy('ecg_chunk', interval '30 days');
        PERFORM add_retention_policy('vitals', interval '365 days');
        PERFORM add_retention_policy('gps_fix', interval '365 days');
        EXECUTE 'CREATE MATERIALIZED VIEW vitals_1min WITH (timescaledb.continuous) AS'
                ' SELECT unit_id, loinc, time_bucket(interval ''1 minute'', measured_at) AS bucket,'
                ' count(*) AS n, avg(value) AS mean, min(value) AS min, max(value) AS max'
                ' FROM vitals GROUP BY unit_id, loinc, bucket WITH NO DATA';
        PERFORM add_continuous_aggregate_policy('vitals_1min', start_offset => interval '1 day',
                                                end_offset => interval '1 minute',
                                                schedule_interval => interval '1 minute');
    ELSE
        INSERT INTO telemetry_storage (mode) VALUES ('native');
        PERFORM telemetry_create_tables(true);
        -- partitions for the rows being carried over from 0001 (maintenance drops the expired ones later)
        PERFORM telemetry_ensure_partition('vitals', t) FROM (SELECT DISTINCT measured_at AS t FROM vitals_0001) s;
        PERFORM telemetry_ensure_partition('ecg_chunk', t) FROM (SELECT DISTINCT start_at AS t FROM ecg_chunk_0001) s;
        PERFORM telemetry_ensure_partition('gps_fix', t) FROM (SELECT DISTINCT sent_at AS t FROM gps_fix_0001) s;
        PERFORM telemetry_maintain(now());
    END IF;
END
$do$;

INSERT INTO vitals SELECT * FROM vitals_0001;
INSERT INTO ecg_chunk (unit_id, seq, start_at, end_at, fs_hz, leads, gain_adc_per_mv, baseline_adc, n_samples, samples,
                       ghe1, lead_off, sent_at, received_at, historical)
SELECT unit_id, seq, start_at, start_at + make_interval(secs => n_samples / fs_hz), fs_hz, leads, gain_adc_per_mv,
       baseline_adc, n_samples, samples, NULL, lead_off, sent_at, received_at, historical
FROM ecg_chunk_0001;
INSERT INTO gps_fix SELECT * FROM gps_fix_0001;
DROP TABLE vitals_0001, ecg_chunk_0001, gps_fix_0001;

-- Latest value per (unit, vital code), kept by the writer in the same transaction as the rows (the board's
-- "latest vitals of all units" reads a few thousand rows instead of scanning the vitals history).
CREATE TABLE vitals_latest (
    unit_id     text             NOT NULL,
    loinc       text             NOT NULL,
    seq         bigint           NOT NULL,
    mdc_code    integer,
    ucum        text             NOT NULL,
    value       double precision NOT NULL,
    measured_at timestamptz      NOT NULL,
    historical  boolean          NOT NULL,
    PRIMARY KEY (unit_id, loinc)
) WITH (fillfactor = 50);
INSERT INTO vitals_latest
SELECT DISTINCT ON (unit_id, loinc) unit_id, loinc, seq, mdc_code, ucum, value, measured_at, historical
FROM vitals ORDER BY unit_id, loinc, measured_at DESC, seq DESC;

-- Highest stored seq per (unit, gap-tracked stream), kept by the writer: the ingest's resume point and the
-- starting point of the store-side gap scan, without scanning the partitioned history.
CREATE TABLE stream_head (
    unit_id text   NOT NULL,
    stream  text   NOT NULL CHECK (stream IN ('ecg', 'vitals', 'gps')),
    max_seq bigint NOT NULL CHECK (max_seq >= 0),
    PRIMARY KEY (unit_id, stream)
) WITH (fillfactor = 50);
INSERT INTO stream_head SELECT unit_id, 'vitals', max(seq) FROM vitals GROUP BY unit_id;
INSERT INTO stream_head SELECT unit_id, 'ecg', max(seq) FROM ecg_chunk GROUP BY unit_id;
INSERT INTO stream_head SELECT unit_id, 'gps', max(seq) FROM gps_fix GROUP BY unit_id;

-- Store-side gap scan (shared-subscription workers): per (unit, stream), every seq <= checked_seq is either
-- stored or covered by a telemetry_gap record.
CREATE TABLE gap_scan_state (
    unit_id     text   NOT NULL,
    stream      text   NOT NULL CHECK (stream IN ('ecg', 'vitals', 'gps')),
    checked_seq bigint NOT NULL CHECK (checked_seq >= -1),
    PRIMARY KEY (unit_id, stream)
);
