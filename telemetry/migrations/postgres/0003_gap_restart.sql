-- 0003: a gap record may be a sequence restart (a new vehicle outbox seeded its counters from the clock: unknown
-- loss, not a range of missing messages).  Old rows are ordinary gaps.
ALTER TABLE telemetry_gap ADD COLUMN restart boolean NOT NULL DEFAULT false;
