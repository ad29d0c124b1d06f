-- Schema version 11: the unkeyed append as a function, so that on Citus it can run whole on
-- the worker that holds the process's shard. Nothing changes on a plain Postgres, where the
-- registry keeps sending the same statement inline.
--
-- On distributed tables Citus plans the inline statement (a CTE that bumps last_seq, then an
-- INSERT ... SELECT of the events) as "pull to coordinator": the UPDATE runs on the worker,
-- its row comes back to the coordinator, the INSERT goes out again, and the process row stays
-- locked across those round trips (measured: 180 appends/s to one process from 24 writers).
-- A PL/pgSQL function (Citus cannot plan a parameterised SQL function's statements on the
-- worker) distributed by its process id (create_distributed_function, co-located with
-- proclog.processes; done by proclog migrate on a Citus coordinator, with append_events,
-- complete_process, suspend_process, write_refusal and refuse_write) is delegated: the
-- coordinator sends the call to that worker, which runs both statements on its local shards.

CREATE FUNCTION proclog.append_unkeyed(
    p_process_id  text,
    p_writer      text,
    p_lease_token uuid,
    p_types       text[],
    p_payloads    jsonb[]
) RETURNS TABLE (seq bigint, occurred_at timestamptz, lease_generation bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_last_seq   bigint;
    v_generation bigint;
BEGIN
    UPDATE proclog.processes p
       SET last_seq = p.last_seq + cardinality(p_types),
           status = CASE WHEN p.status = 'pending' THEN 'running' ELSE p.status END,
           updated_at = now()
     WHERE p.process_id = p_process_id
       AND p.terminal_state IS NULL
       AND proclog.fence_holds(p_lease_token, p.lease_token, p.lease_expires_at)
    RETURNING p.last_seq, p.lease_generation INTO v_last_seq, v_generation;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
    INSERT INTO proclog.events AS e
           (process_id, seq, event_type, payload, writer, lease_generation)
    SELECT p_process_id, v_last_seq - cardinality(p_types) + r.ord, r.t, r.p, p_writer,
           CASE WHEN p_lease_token IS NULL THEN NULL ELSE v_generation END
      FROM unnest(p_types, p_payloads) WITH ORDINALITY AS r(t, p, ord)
    RETURNING e.seq, e.occurred_at, e.lease_generation;
END $$;

REVOKE ALL ON FUNCTION proclog.append_unkeyed(text, text, uuid, text[], jsonb[]) FROM PUBLIC;
