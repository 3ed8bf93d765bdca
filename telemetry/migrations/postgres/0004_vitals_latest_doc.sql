-- 0004: the latest vitals of each unit as one ready-made JSON text, kept by the writer after every vitals batch
-- from vitals_latest (which stays the per-code truth: latest wins per code by (measured_at, seq)).
-- The board's "latest vitals of every unit" then reads one short row per unit instead of aggregating every code
-- of every unit on each read: the work is done once per write, not once per reader.
-- entries: JSON array, one [loinc, mdc_code, ucum, value, measured_at_us, seq, historical] per code,
-- measured_at_us = integer microseconds since 1970-01-01 UTC.
CREATE TABLE vitals_latest_doc (
    unit_id text PRIMARY KEY,
    entries text NOT NULL
) WITH (fillfactor = 50);

INSERT INTO vitals_latest_doc (unit_id, entries)
SELECT unit_id,
       json_agg(json_build_array(loinc, mdc_code, ucum, value, (extract(epoch FROM measured_at) * 1000000)::bigint,
                                 seq, historical) ORDER BY loinc)::text
FROM vitals_latest GROUP BY unit_id;
