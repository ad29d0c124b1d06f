-- proclog schema version 5: every invariant of the schema kept, none checked on an append.
--
-- Postgres checks every CHECK constraint of a table on every UPDATE of a row, whichever
-- columns change, and re-reads their expressions for every statement; a foreign key runs one
-- locking lookup per inserted row. An append changes only processes.last_seq (and status,
-- pending -> running, once) and inserts events, so these checks move to where the guarded
-- columns change:
--
--   * proclog.check_process_row() holds every rule of a processes row that the CHECK
--     constraints held, under the same names. Triggers run it on INSERT, on an UPDATE that
--     sets any column an append does not set, on a status change, and on an UPDATE of
--     last_seq only when the process is terminal or the counter would go backwards.
--   * The foreign key events -> processes is dropped. Every write of proclog's functions and
--     statements takes the process row's lock (the UPDATE of last_seq) before it inserts an
--     event in the same statement, so an event never names a missing process, and prune
--     (a DELETE of processes) cannot remove a process under an append. Deleting a process
--     still deletes its events: a statement-level trigger does it, set-based, as ON DELETE
--     CASCADE did. What is no longer guarded: a hand-written INSERT into proclog.events naming
--     no process (measured: a statement-level check cost 15% of append throughput, the
--     foreign key 11%). Only roles with write access to the schema can do that; the reader
--     roles cannot.

ALTER TABLE proclog.events DROP CONSTRAINT events_process_id_fkey;

ALTER TABLE proclog.processes
    DROP CONSTRAINT processes_disposition_check,
    DROP CONSTRAINT processes_status_check,
    DROP CONSTRAINT processes_last_seq_check,
    DROP CONSTRAINT processes_lease_generation_check,
    DROP CONSTRAINT processes_terminal_state_check,
    DROP CONSTRAINT processes_attempts_check,
    DROP CONSTRAINT terminal_column_whole,
    DROP CONSTRAINT terminal_matches_status,
    DROP CONSTRAINT terminal_is_sealed,
    DROP CONSTRAINT lease_whole;

-- Raises check_violation (23514), naming the rule, for a processes row that breaks one.
CREATE FUNCTION proclog.check_process_row() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_rule text;
BEGIN
    IF NEW.disposition IS NULL OR NEW.disposition NOT IN ('rerun', 'abandon', 'external') THEN
        v_rule := 'processes_disposition_check';
    ELSIF NEW.status IS NULL OR NEW.status NOT IN
            ('pending', 'running', 'completed', 'failed', 'cancelled', 'abandoned') THEN
        v_rule := 'processes_status_check';
    ELSIF NEW.last_seq < 0 THEN
        v_rule := 'processes_last_seq_check';
    ELSIF TG_OP = 'UPDATE' AND NEW.last_seq < OLD.last_seq THEN
        v_rule := 'processes_last_seq_never_decreases';
    ELSIF NEW.lease_generation < 0 THEN
        v_rule := 'processes_lease_generation_check';
    ELSIF TG_OP = 'UPDATE' AND NEW.lease_generation < OLD.lease_generation THEN
        v_rule := 'processes_lease_generation_never_decreases';
    ELSIF NEW.attempts < 0 THEN
        v_rule := 'processes_attempts_check';
    ELSIF NEW.terminal_state NOT IN ('completed', 'failed', 'cancelled', 'abandoned') THEN
        v_rule := 'processes_terminal_state_check';
    ELSIF NOT ((NEW.terminal_state IS NULL) = (NEW.terminal_seq IS NULL)
               AND (NEW.terminal_state IS NULL) = (NEW.output IS NULL)
               AND (NEW.terminal_state IS NULL) = (NEW.completed_at IS NULL)) THEN
        v_rule := 'terminal_column_whole';
    ELSIF NOT coalesce(NEW.terminal_state IS NULL AND NEW.status IN ('pending', 'running')
                       OR NEW.terminal_state = NEW.status, false) THEN
        v_rule := 'terminal_matches_status';
    ELSIF NOT (NEW.terminal_state IS NULL
               OR (NEW.lease_token IS NULL AND NEW.terminal_seq = NEW.last_seq)) THEN
        v_rule := 'terminal_is_sealed';
    ELSIF TG_OP = 'UPDATE' AND OLD.terminal_state IS NOT NULL
          AND (NEW.terminal_state IS DISTINCT FROM OLD.terminal_state
               OR NEW.terminal_seq IS DISTINCT FROM OLD.terminal_seq
               OR NEW.output IS DISTINCT FROM OLD.output) THEN
        v_rule := 'terminal_is_final';
    ELSIF NOT ((NEW.lease_token IS NULL) = (NEW.lease_owner IS NULL)
               AND (NEW.lease_token IS NULL) = (NEW.lease_expires_at IS NULL)) THEN
        v_rule := 'lease_whole';
    ELSE
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'new row for relation "processes" violates check constraint "%"', v_rule
        USING ERRCODE = 'check_violation', SCHEMA = 'proclog', TABLE = 'processes',
              CONSTRAINT = v_rule;
END $$;

CREATE TRIGGER processes_check_insert
    BEFORE INSERT ON proclog.processes
    FOR EACH ROW EXECUTE FUNCTION proclog.check_process_row();

-- Every column an append never sets.
CREATE TRIGGER processes_check_update
    BEFORE UPDATE OF process_id, kind, input, disposition, created_at, lease_owner,
                     lease_token, lease_generation, lease_expires_at, terminal_state,
                     terminal_seq, output, completed_at, attempts
    ON proclog.processes
    FOR EACH ROW EXECUTE FUNCTION proclog.check_process_row();

-- The columns an append sets: checked only when they change in a way an append never does
-- (a status change happens once per process, pending -> running on its first append).
CREATE TRIGGER processes_check_log
    BEFORE UPDATE OF last_seq, status ON proclog.processes
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.terminal_state IS NOT NULL
          OR NEW.last_seq < OLD.last_seq)
    EXECUTE FUNCTION proclog.check_process_row();

-- What ON DELETE CASCADE did: a deleted process takes its events with it.
-- It runs with the table owner's rights, as the cascade did: a role allowed to delete
-- processes need not be allowed to delete events.
CREATE FUNCTION proclog.delete_events_of_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM proclog.events e USING removed r WHERE e.process_id = r.process_id;
    RETURN NULL;
END $$;

CREATE TRIGGER processes_delete_events
    AFTER DELETE ON proclog.processes
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION proclog.delete_events_of_deleted();
