-- proclog schema version 13: start policies (CONTRACT §10): de-duplication within a window,
-- singleton per key, debounce.
--
-- A start key belongs to a kind. Its row names the process the key's last accepted start
-- made; every start with a policy takes the row's lock first, so starts of one key are
-- decided one at a time, whatever the number of pods.
--
--   process_id   the process the key's last accepted start made (or debounced into)
--   policy       the policy of that start: deduplicate, singleton, debounce
--   started_at   when that start was accepted (a debounced start moves it)
--   expires_at   a de-duplication key's end of window; NULL: kept while its process is
--                (prune removes the row with the process)

CREATE TABLE proclog.start_keys (
    kind        text NOT NULL,
    start_key   text NOT NULL,
    process_id  text NOT NULL,
    policy      text NOT NULL CHECK (policy IN ('deduplicate', 'singleton', 'debounce')),
    started_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    PRIMARY KEY (kind, start_key)
);

COMMENT ON TABLE proclog.start_keys IS 'start policies: the process each start key''s last accepted start made';

CREATE INDEX start_keys_process ON proclog.start_keys (process_id);
CREATE INDEX start_keys_expiry ON proclog.start_keys (expires_at) WHERE expires_at IS NOT NULL;

-- A start under a policy, decided under the key row's lock, in one transaction. Returns
-- what happened and the process that stands for the start:
--   created       a new process (the registration's), the key now names it
--   existing      the key already names this very id (a retried start)
--   deduplicated  a start within the de-duplication window came first: its process
--   running       a singleton key's process has not ended: that process
--   debounced     a debounce key's process had not started: it takes this input and starts
--                 a window from now
--   id_taken      the id exists and is not the key's: the caller compares content (the key
--                 is left as it was)
-- A refused singleton raises PLSK0 with the process that has not ended as its detail.
CREATE FUNCTION proclog.start_process(
    p_process_id   text,
    p_kind         text,
    p_input        jsonb,
    p_disposition  text,
    p_start_at     timestamptz,
    p_start_in_ms  bigint,
    p_deadline     timestamptz,
    p_timeout_ms   bigint,
    p_retry_policy jsonb,
    p_trace_parent text,
    p_parent_id    text,
    p_policy       text,
    p_key          text,
    p_window_ms    bigint,
    p_refuse       boolean
) RETURNS TABLE (decision text, started_id text)
LANGUAGE plpgsql AS $$
DECLARE
    v_key        proclog.start_keys;
    v_fresh      boolean := false;
    v_live       boolean;
    v_unstarted  boolean;
    v_window     interval := coalesce(p_window_ms, 0) * interval '1 millisecond';
    v_wake       timestamptz;
    v_old_wake   timestamptz;
    v_deadline   timestamptz;
BEGIN
    LOOP
        SELECT * INTO v_key FROM proclog.start_keys k
         WHERE k.kind = p_kind AND k.start_key = p_key
           FOR UPDATE;
        EXIT WHEN FOUND;
        INSERT INTO proclog.start_keys AS k (kind, start_key, process_id, policy)
        VALUES (p_kind, p_key, p_process_id, p_policy)
        ON CONFLICT ON CONSTRAINT start_keys_pkey DO NOTHING;
        IF FOUND THEN
            v_fresh := true;
            EXIT;
        END IF;
    END LOOP;

    IF NOT v_fresh THEN
        IF v_key.process_id = p_process_id
           AND EXISTS (SELECT 1 FROM proclog.processes p WHERE p.process_id = p_process_id) THEN
            RETURN QUERY SELECT 'existing'::text, p_process_id;
            RETURN;
        END IF;
        SELECT p.terminal_state IS NULL,
               p.terminal_state IS NULL AND p.status = 'pending' AND p.started_at IS NULL
                   AND p.lease_token IS NULL,
               p.wake_at, p.deadline
          INTO v_live, v_unstarted, v_old_wake, v_deadline
          FROM proclog.processes p
         WHERE p.process_id = v_key.process_id
           FOR UPDATE;
        -- v_live is NULL when the key's process is gone (pruned): as if the key were new.
        IF p_policy = 'deduplicate' AND v_live IS NOT NULL
           AND v_key.expires_at IS NOT NULL AND v_key.expires_at > now() THEN
            RETURN QUERY SELECT 'deduplicated'::text, v_key.process_id;
            RETURN;
        ELSIF p_policy = 'singleton' AND v_live THEN
            IF p_refuse THEN
                RAISE EXCEPTION 'a process of start key % has not ended', p_key
                    USING ERRCODE = 'PLSK0', DETAIL = v_key.process_id;
            END IF;
            RETURN QUERY SELECT 'running'::text, v_key.process_id;
            RETURN;
        ELSIF p_policy = 'debounce' AND v_unstarted THEN
            -- Its deadline (if any) moves with its start: a debounced process does not start
            -- past it.
            v_wake := greatest(now() + v_window, p_start_at,
                               now() + p_start_in_ms * interval '1 millisecond');
            -- (Computed here: Citus takes no timestamp arithmetic on columns in an UPDATE.)
            -- (In seconds: interval arithmetic in days would follow the session's time zone.)
            v_deadline := v_deadline + (extract(epoch FROM v_wake)
                                        - extract(epoch FROM coalesce(v_old_wake, v_wake)))
                                       * interval '1 second';
            UPDATE proclog.processes p
               SET input = p_input,
                   deadline = v_deadline,
                   wake_at = v_wake,
                   updated_at = now()
             WHERE p.process_id = v_key.process_id;
            UPDATE proclog.start_keys k
               SET started_at = now(), policy = p_policy, expires_at = NULL
             WHERE k.kind = p_kind AND k.start_key = p_key;
            RETURN QUERY SELECT 'debounced'::text, v_key.process_id;
            RETURN;
        END IF;
    END IF;

    v_wake := coalesce(p_start_at, now() + p_start_in_ms * interval '1 millisecond');
    IF p_policy = 'debounce' THEN
        v_wake := greatest(v_wake, now() + v_window);
    END IF;
    INSERT INTO proclog.processes AS p
           (process_id, kind, input, disposition, wake_at, deadline, retry_policy,
            trace_parent, parent_id)
    VALUES (p_process_id, p_kind, p_input, p_disposition, v_wake,
            coalesce(p_deadline, now() + p_timeout_ms * interval '1 millisecond'),
            p_retry_policy, p_trace_parent, p_parent_id)
    ON CONFLICT ON CONSTRAINT processes_pkey DO NOTHING;
    IF NOT FOUND THEN
        IF v_fresh THEN
            DELETE FROM proclog.start_keys k WHERE k.kind = p_kind AND k.start_key = p_key;
        END IF;
        RETURN QUERY SELECT 'id_taken'::text, p_process_id;
        RETURN;
    END IF;
    UPDATE proclog.start_keys k
       SET process_id = p_process_id,
           policy = p_policy,
           started_at = now(),
           expires_at = CASE WHEN p_policy = 'deduplicate' THEN now() + v_window END
     WHERE k.kind = p_kind AND k.start_key = p_key;
    RETURN QUERY SELECT 'created'::text, p_process_id;
END $$;

REVOKE ALL ON FUNCTION proclog.start_process(text, text, jsonb, text, timestamptz, bigint,
    timestamptz, bigint, jsonb, text, text, text, text, bigint, boolean) FROM PUBLIC;
