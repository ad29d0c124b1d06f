-- proclog schema version 8: what a run asks about its process, on the process row.
--
-- A run used to scan its own log for a cancellation request (three ways) and for an earlier
-- start (an `abandon` process runs at most once). Both are now columns of the process row,
-- written in the statement that appends the event, so a run asks with one row read (and a
-- pod with one read for all its runs):
--
--   started_at      when the first `process.started` was appended (NULL: never started)
--   cancel_request  the payload of the first `process.cancel_requested` ({reason, by}),
--                   NULL while none was made
--
-- A row trigger on proclog.events sets them, for those two reserved types only (its WHEN
-- clause is all an ordinary append pays), whichever statement inserts the event: the single
-- and group appends, `append_events`, `append_group`, or SQL by hand. The first event of each
-- kind wins; later ones change nothing.

ALTER TABLE proclog.processes
    ADD COLUMN started_at timestamptz,
    ADD COLUMN cancel_request jsonb;

COMMENT ON COLUMN proclog.processes.started_at IS 'when the first process.started was appended; NULL: never started';
COMMENT ON COLUMN proclog.processes.cancel_request IS 'the first process.cancel_requested payload ({reason, by}); NULL: none';

-- Backfill from the logs of existing processes.
UPDATE proclog.processes p
   SET started_at = s.occurred_at
  FROM (SELECT process_id, min(occurred_at) AS occurred_at FROM proclog.events
         WHERE event_type = 'process.started' GROUP BY process_id) s
 WHERE p.process_id = s.process_id;
UPDATE proclog.processes p
   SET cancel_request = c.payload
  FROM (SELECT DISTINCT ON (process_id) process_id, payload FROM proclog.events
         WHERE event_type = 'process.cancel_requested' ORDER BY process_id, seq) c
 WHERE p.process_id = c.process_id;

-- Runs with the caller's rights (a writer may update processes); refuses any other table.
CREATE FUNCTION proclog.record_process_state() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_SCHEMA IS DISTINCT FROM 'proclog' OR TG_TABLE_NAME IS DISTINCT FROM 'events' THEN
        RAISE EXCEPTION 'proclog.record_process_state runs only as a trigger of proclog.events'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.event_type = 'process.started' THEN
        UPDATE proclog.processes SET started_at = NEW.occurred_at
         WHERE process_id = NEW.process_id AND started_at IS NULL;
    ELSE
        UPDATE proclog.processes SET cancel_request = NEW.payload
         WHERE process_id = NEW.process_id AND cancel_request IS NULL;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER events_record_process_state
    AFTER INSERT ON proclog.events
    FOR EACH ROW
    WHEN (NEW.event_type IN ('process.started', 'process.cancel_requested'))
    EXECUTE FUNCTION proclog.record_process_state();
