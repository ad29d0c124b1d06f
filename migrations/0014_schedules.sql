-- proclog schema version 14: schedules (CONTRACT §10).
--
-- A schedule is a row: a cron expression read in an explicit time zone, the kind and input of
-- the processes it starts, its overlap and catch-up policies, and its progress: the next due
-- time it has not produced yet. A pod claims a due row for a short while (claimed_by,
-- claimed_until), registers the process of each due time its policies allow (its id derived
-- from the schedule and the due time, so a due time makes one process whoever produces it)
-- and moves next_due_at past them, conditionally on the value it read.

CREATE TABLE proclog.schedules (
    schedule_id     text        NOT NULL PRIMARY KEY,
    cron            text        NOT NULL,
    time_zone       text        NOT NULL,
    kind            text        NOT NULL,
    input           jsonb       NOT NULL DEFAULT 'null',
    disposition     text        NOT NULL CHECK (disposition IN ('rerun', 'abandon', 'external')),
    overlap         text        NOT NULL CHECK (overlap IN ('skip', 'queue_one', 'allow')),
    catch_up        text        NOT NULL CHECK (catch_up IN ('skip_missed', 'run_once', 'run_all')),
    catch_up_limit  integer     NOT NULL CHECK (catch_up_limit BETWEEN 1 AND 1000),
    missed_after_ms bigint      NOT NULL CHECK (missed_after_ms BETWEEN 0 AND 86400000),
    paused          boolean     NOT NULL DEFAULT false,
    next_due_at     timestamptz,
    last_due_at     timestamptz,
    last_process_id text,
    skipped         bigint      NOT NULL DEFAULT 0 CHECK (skipped >= 0),
    held            boolean     NOT NULL DEFAULT false,
    claimed_by      text,
    claimed_until   timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE proclog.schedules IS 'cron schedules: each due time yields one process (id <schedule>.<due time>)';
COMMENT ON COLUMN proclog.schedules.next_due_at IS 'the next due time not produced yet (NULL: none)';
COMMENT ON COLUMN proclog.schedules.claimed_until IS 'a pod producing its due times holds it until then; a held due time is looked at again then';
COMMENT ON COLUMN proclog.schedules.held IS 'next_due_at waits for the previous process to end (overlap queue_one)';

-- What is due, in due order; a paused schedule is never due.
CREATE INDEX schedules_due ON proclog.schedules (next_due_at) WHERE NOT paused;
