-- proclog schema version 7: least privilege.
--
-- Three kinds of role use a proclog database:
--   * the owner, which runs the migrations and owns every object of the schema;
--   * writers (`proclog grant-writer ROLE`): the pods' role, with exactly the DML and the
--     functions proclog's statements use, and no right to change the schema;
--   * readers (`proclog grant-reader ROLE`): SELECT on every table, nothing else.
-- Grants to writers and readers are made by the migrator after every migration (they name
-- roles, so they live in src/pg/roles.rs, not here). This file takes away what PUBLIC had.

-- Postgres lets PUBLIC execute every new function. No proclog function is for everyone: the
-- writers get EXECUTE on the ones their statements call, the readers on none. (Creating a
-- trigger needs EXECUTE on its function, so this also stops anyone from putting proclog's
-- trigger functions on a table of their own.) The migrator repeats the revoke after every
-- migration, whoever runs it; the default privilege covers functions made by this owner.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA proclog FROM PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA proclog REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
REVOKE ALL ON SCHEMA proclog FROM PUBLIC;

-- What ON DELETE CASCADE did, now with the caller's rights: a role that may delete processes
-- (the writers, by prune) is also granted DELETE on events. It was SECURITY DEFINER (the
-- owner's rights, a superuser's under compose), which let any role that could put it on a
-- table of its own delete every log. It refuses to run for anything but the statement-level
-- AFTER DELETE trigger of proclog.processes.
CREATE OR REPLACE FUNCTION proclog.delete_events_of_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_TABLE_SCHEMA IS DISTINCT FROM 'proclog'
       OR TG_TABLE_NAME IS DISTINCT FROM 'processes'
       OR TG_OP IS DISTINCT FROM 'DELETE'
       OR TG_LEVEL IS DISTINCT FROM 'STATEMENT'
       OR TG_WHEN IS DISTINCT FROM 'AFTER' THEN
        RAISE EXCEPTION 'proclog.delete_events_of_deleted runs only as the statement trigger of proclog.processes'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    DELETE FROM proclog.events e USING removed r WHERE e.process_id = r.process_id;
    RETURN NULL;
END $$;

-- The row rules raise only and run with the caller's rights; they too refuse to run on
-- another table. (No pinned search_path: it would cost a setting change on every call, and a
-- function with the caller's rights gives a caller nothing it does not have.)
CREATE OR REPLACE FUNCTION proclog.check_process_row() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_rule text;
BEGIN
    IF TG_TABLE_SCHEMA IS DISTINCT FROM 'proclog' OR TG_TABLE_NAME IS DISTINCT FROM 'processes' THEN
        RAISE EXCEPTION 'proclog.check_process_row runs only as a trigger of proclog.processes'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
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

-- Roles given the pods' rights with `proclog grant-writer`, granted again after every
-- migration (as proclog.readers are).
CREATE TABLE proclog.writers (
    role_name  text        NOT NULL PRIMARY KEY,
    granted_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE proclog.writers IS 'roles with the pods'' rights on the proclog schema (proclog grant-writer)';
