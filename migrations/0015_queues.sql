-- proclog schema version 15: queues with limits (CONTRACT §10).
--
-- A process belongs to a queue (NULL: its kind's, the default) and may carry a concurrency
-- key (for example a tenant; '' when it has none) and a priority (higher first, -100 to 100).
-- A queue is controlled once it has a row in proclog.queues: its limits (global concurrency,
-- concurrency per pod, starts per period; for the queue as a whole, for each key, and for
-- named keys), kept as a JSON document the library checks. Pods claim a controlled queue's
-- work one claim at a time (under an advisory lock held until the claim has committed), count
-- live leases (and recent starts) over
-- SQL under that lock, and serve its keys round-robin from the key after `cursor_key`. Keys
-- compare byte by byte (collation "C"), the same order everywhere.
--
--   queue           a process's queue (NULL: its kind); set at registration, never changed
--   concurrency_key its concurrency key ('' none); set at registration, never changed
--   priority        higher is claimed first among its key's runnable work

ALTER TABLE proclog.processes
    ADD COLUMN queue text,
    ADD COLUMN concurrency_key text COLLATE "C" NOT NULL DEFAULT '',
    ADD COLUMN priority smallint NOT NULL DEFAULT 0;

COMMENT ON COLUMN proclog.processes.queue IS 'the queue it is claimed from (NULL: its kind)';
COMMENT ON COLUMN proclog.processes.concurrency_key IS 'its concurrency key within the queue ('''': none)';
COMMENT ON COLUMN proclog.processes.priority IS 'higher is claimed first among its key''s runnable work';

-- A queue's work by key, then in claim order: the next key after another is one descent, a
-- key's head one more. Live processes only.
CREATE INDEX processes_queue_key ON proclog.processes
    ((coalesce(queue, kind)), concurrency_key, priority DESC, (coalesce(wake_at, created_at)),
     process_id)
    WHERE terminal_state IS NULL;
-- A queue's live leases by key (what its limits count).
CREATE INDEX processes_queue_leases ON proclog.processes
    ((coalesce(queue, kind)), concurrency_key, lease_expires_at)
    WHERE terminal_state IS NULL AND lease_expires_at IS NOT NULL;

CREATE TABLE proclog.queues (
    queue       text        NOT NULL PRIMARY KEY,
    limits      jsonb       NOT NULL,
    cursor_key  text COLLATE "C",
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE proclog.queues IS 'controlled queues: their limits, and the key served last (round-robin)';
COMMENT ON COLUMN proclog.queues.cursor_key IS 'the key served last: the next claim starts after it';

-- The starts of a controlled queue with a rate limit, kept for the longest period of its
-- limits (each claim forgets the older ones).
CREATE TABLE proclog.queue_starts (
    queue           text        NOT NULL,
    concurrency_key text COLLATE "C" NOT NULL,
    process_id      text        NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE proclog.queue_starts IS 'recent starts of rate-limited queues';

CREATE INDEX queue_starts_by_key ON proclog.queue_starts (queue, concurrency_key, started_at);
CREATE INDEX queue_starts_by_time ON proclog.queue_starts (queue, started_at);

-- A schedule's processes may name a queue (NULL: their kind's).
ALTER TABLE proclog.schedules ADD COLUMN queue text;

-- start_process, as in version 13, with the queue, the concurrency key and the priority.
DROP FUNCTION proclog.start_process(text, text, jsonb, text, timestamptz, bigint,
    timestamptz, bigint, jsonb, text, text, text, text, bigint, boolean);
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
    p_refuse       boolean,
    p_queue        text,
    p_key_of_queue text,
    p_priority     smallint
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
            trace_parent, parent_id, queue, concurrency_key, priority)
    VALUES (p_process_id, p_kind, p_input, p_disposition, v_wake,
            coalesce(p_deadline, now() + p_timeout_ms * interval '1 millisecond'),
            p_retry_policy, p_trace_parent, p_parent_id, p_queue, p_key_of_queue, p_priority)
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
    timestamptz, bigint, jsonb, text, text, text, text, bigint, boolean, text, text, smallint)
    FROM PUBLIC;
