-- 0005: the vitals time index is keyed (unit, time), not (unit, code, time).
-- The per-unit queries (trends since first contact, a case's replay) select a unit and a time range, never one code
-- alone; an index per (unit, code) made every vitals set touch five index leaves per unit instead of one, and at
-- a thousand units that working set (thousands of hot leaves, each written in full to the WAL after every
-- checkpoint) competed with the rest of the store for the buffer cache.  Building the new index reads the whole
-- vitals table once.
DROP INDEX IF EXISTS vitals_unit_code_time;
CREATE INDEX IF NOT EXISTS vitals_unit_time ON vitals (unit_id, measured_at);
