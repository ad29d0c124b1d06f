-- Schema version 10: what lets the tables be distributed on Citus, changing nothing on a
-- plain Postgres.
--
-- 1. On Citus, a distributed table's triggers fire on its shards, tables of the same schema
--    named <table>_<shard id> on the workers. The guards that keep each trigger function to
--    its own table (so that nobody can put it on a table of their own) accept those names
--    too; only the schema's owner can create tables in proclog. The bodies are otherwise
--    those of versions 7 and 9, but on a shard, where Citus lets no statement start a
--    distributed query: there the triggers that write the other table (the state of a
--    process on its row, the events of deleted processes) write its co-located shard, on
--    the same node, by name.
-- 2. Citus refuses a statement on a distributed table with a non-immutable function inside
--    CASE or COALESCE (it evaluates now() and its like before routing). The lease fence,
--    inlined into every fenced write, said coalesce(expires_at > now(), false); it now says
--    the same without COALESCE. Never NULL, as before.
-- 3. The pods view (below).

CREATE OR REPLACE FUNCTION proclog.fence_holds(p_fence uuid, p_token uuid, p_expires_at timestamptz)
RETURNS boolean LANGUAGE sql STABLE PARALLEL SAFE
RETURN p_fence IS NULL
    OR (p_token IS NOT DISTINCT FROM p_fence AND p_expires_at IS NOT NULL AND p_expires_at > now());

CREATE OR REPLACE FUNCTION proclog.check_process_row() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_rule text;
BEGIN
    IF TG_TABLE_SCHEMA IS DISTINCT FROM 'proclog' OR TG_TABLE_NAME !~ '^processes(_[0-9]+)?$' THEN
        RAISE EXCEPTION 'proclog.check_process_row runs only as a trigger of proclog.processes'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.disposition IS NULL OR NEW.disposition NOT IN ('rerun', 'abandon', 'external') THEN
        v_rule := 'processes_disposition_check';
    ELSIF NEW.status IS NULL OR NEW.status NOT IN
            ('pending', 'running', 'waiting', 'completed', 'failed', 'cancelled', 'abandoned') THEN
        v_rule := 'processes_status_check';
    ELSIF NEW.last_seq < 0 THEN
        v_rule := 'processes_last_seq_check';
    ELSIF TG_OP = 'UPDATE' AND NEW.last_seq < OLD.last_seq THEN
        v_rule := 'processes_last_seq_never_decreases';
    ELSIF NEW.lease_generation < 0 THEN
        v_rule := 'processes_lease_generation_check';
    ELSIF TG_OP = 'UPDATE' AND NEW.lease_generation < OLD.lease_generation THEN
        v_rule := 'processes_lease_generation_never_decreases';
    ELSIF NEW.attempts < 0 OR NEW.retries < 0 THEN
        v_rule := 'processes_attempts_check';
    ELSIF NEW.terminal_state NOT IN ('completed', 'failed', 'cancelled', 'abandoned') THEN
        v_rule := 'processes_terminal_state_check';
    ELSIF NOT ((NEW.terminal_state IS NULL) = (NEW.terminal_seq IS NULL)
               AND (NEW.terminal_state IS NULL) = (NEW.output IS NULL)
               AND (NEW.terminal_state IS NULL) = (NEW.completed_at IS NULL)) THEN
        v_rule := 'terminal_column_whole';
    ELSIF NOT coalesce(NEW.terminal_state IS NULL AND NEW.status IN ('pending', 'running', 'waiting')
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
    ELSIF NEW.status = 'waiting' AND NEW.lease_token IS NOT NULL THEN
        v_rule := 'waiting_holds_no_lease';
    ELSE
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'new row for relation "processes" violates check constraint "%"', v_rule
        USING ERRCODE = 'check_violation', SCHEMA = 'proclog', TABLE = 'processes',
              CONSTRAINT = v_rule;
END $$;

CREATE OR REPLACE FUNCTION proclog.record_process_state() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_shard text;
BEGIN
    IF TG_TABLE_SCHEMA IS DISTINCT FROM 'proclog' OR TG_TABLE_NAME !~ '^events(_[0-9]+)?$' THEN
        RAISE EXCEPTION 'proclog.record_process_state runs only as a trigger of proclog.events'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_TABLE_NAME = 'events' THEN
        IF NEW.event_type = 'process.started' THEN
            UPDATE proclog.processes SET started_at = NEW.occurred_at
             WHERE process_id = NEW.process_id AND started_at IS NULL;
        ELSIF NEW.event_type = 'process.cancel_requested' THEN
            UPDATE proclog.processes SET cancel_request = NEW.payload
             WHERE process_id = NEW.process_id AND cancel_request IS NULL;
        ELSE
            -- Whatever its status: a waiting process that a host or a canceller claimed for
            -- a moment still waits (its release makes it `waiting` again).
            UPDATE proclog.processes SET wake_at = now()
             WHERE process_id = NEW.process_id
               AND waiting_for = NEW.payload ->> 'topic'
               AND wake_at > now();
        END IF;
        RETURN NULL;
    END IF;
    -- On a Citus shard: a shard may not start a distributed query, so the same updates go
    -- to the co-located shard of processes, on this node.
    v_shard := shard_name('proclog.processes'::regclass,
                          get_shard_id_for_distribution_column('proclog.processes'::regclass,
                                                               NEW.process_id));
    IF NEW.event_type = 'process.started' THEN
        EXECUTE format('UPDATE %s SET started_at = $1
                         WHERE process_id = $2 AND started_at IS NULL', v_shard)
            USING NEW.occurred_at, NEW.process_id;
    ELSIF NEW.event_type = 'process.cancel_requested' THEN
        EXECUTE format('UPDATE %s SET cancel_request = $1
                         WHERE process_id = $2 AND cancel_request IS NULL', v_shard)
            USING NEW.payload, NEW.process_id;
    ELSE
        EXECUTE format('UPDATE %s SET wake_at = now()
                         WHERE process_id = $1 AND waiting_for = $2 AND wake_at > now()', v_shard)
            USING NEW.process_id, NEW.payload ->> 'topic';
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION proclog.delete_events_of_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_removed text[];
BEGIN
    IF TG_TABLE_SCHEMA IS DISTINCT FROM 'proclog'
       OR TG_TABLE_NAME !~ '^processes(_[0-9]+)?$'
       OR TG_OP IS DISTINCT FROM 'DELETE'
       OR TG_LEVEL IS DISTINCT FROM 'STATEMENT'
       OR TG_WHEN IS DISTINCT FROM 'AFTER' THEN
        RAISE EXCEPTION 'proclog.delete_events_of_deleted runs only as the statement trigger of proclog.processes'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_TABLE_NAME = 'processes' THEN
        DELETE FROM proclog.events e USING removed r WHERE e.process_id = r.process_id;
    ELSE
        -- On a Citus shard: a shard may not start a distributed query, so the events go
        -- from the co-located shard of events, on this node (one shard: every removed row
        -- hashes to it).
        SELECT array_agg(process_id) INTO v_removed FROM removed;
        IF v_removed IS NOT NULL THEN
            EXECUTE format('DELETE FROM %s WHERE process_id = ANY ($1)',
                           shard_name('proclog.events'::regclass,
                                      get_shard_id_for_distribution_column(
                                          'proclog.events'::regclass, v_removed[1])))
                USING v_removed;
        END IF;
    END IF;
    RETURN NULL;
END $$;

-- 3. The pods view counted each pod's leases with a correlated subquery, which Citus cannot
--    run over a distributed table: the same count, grouped once and joined.
CREATE OR REPLACE VIEW proclog.pod_status AS
SELECT p.pod_id,
       CASE WHEN p.state = 'stopped' THEN 'stopped'
            WHEN p.heartbeat_at < now() - 3 * p.heartbeat_every THEN 'gone'
            ELSE p.state END AS status,
       p.address,
       p.version,
       p.concurrency,
       p.started_at,
       p.heartbeat_at,
       now() - p.heartbeat_at AS heartbeat_age,
       p.stopped_at,
       -- Live leases exist only on runnable rows: the partial index processes_lease_expiry
       -- holds exactly those, so this reads few rows whatever the table's size.
       coalesce(l.leases_held, 0) AS leases_held
  FROM proclog.pods p
  LEFT JOIN (SELECT lease_owner, count(*) AS leases_held
               FROM proclog.processes
              WHERE lease_expires_at > now() AND terminal_state IS NULL
                AND disposition <> 'external' AND lease_expires_at IS NOT NULL
              GROUP BY lease_owner) l ON l.lease_owner = p.pod_id;
