-- proclog schema version 4: group commit.
--
-- proclog.append_group runs the appends of several callers (any mix of processes) in one
-- statement, hence one transaction and one WAL flush. It holds the one copy of the append
-- rules (dense seqs under the process row's lock, fencing, sealing, replay keys);
-- proclog.append_events (below) is now a single caller of it. A refusal is returned as that
-- caller's answer instead of raised, so one caller's refusal leaves the others' appends in
-- place.
--
-- Callers are given in ascending process id order (the client sorts them), so every batch
-- locks process rows in the same global order and two batches can never deadlock.

-- The lease fence, in one place: a write fenced by p_fence (NULL: unfenced) may proceed only
-- while p_fence is the process's current lease token and that lease has not expired on the
-- database clock. Never NULL (a released lease has no token: the fence does not hold). A
-- plain SQL function, inlined by the planner where it is used: the unkeyed
-- append (src/pg/registry.rs), proclog.append_events, proclog.append_group,
-- proclog.complete_process and lease renewal. (Claiming asks the opposite question, "is there
-- no live lease?", with `lease_expires_at IS NULL OR lease_expires_at <= now()`, written so
-- that the lease-expiry index serves it.)
CREATE FUNCTION proclog.fence_holds(p_fence uuid, p_token uuid, p_expires_at timestamptz)
RETURNS boolean LANGUAGE sql STABLE PARALLEL SAFE
RETURN p_fence IS NULL
    OR (p_token IS NOT DISTINCT FROM p_fence AND coalesce(p_expires_at > now(), false));

-- Why a write to a process that an UPDATE did not match was refused, without raising:
-- 'not_found', 'terminal' (detail: the state) or 'lease_lost'. The raising twin is
-- proclog.refuse_write.
CREATE FUNCTION proclog.write_refusal(p_process_id text, OUT reason text, OUT detail text)
LANGUAGE plpgsql AS $$
DECLARE
    v_state text;
BEGIN
    SELECT p.terminal_state INTO v_state FROM proclog.processes p
     WHERE p.process_id = p_process_id;
    IF NOT FOUND THEN
        reason := 'not_found';
    ELSIF v_state IS NOT NULL THEN
        reason := 'terminal';
        detail := v_state;
    ELSE
        reason := 'lease_lost';
    END IF;
END $$;

-- p_process_ids, p_tokens, p_starts, p_counts: one entry per caller (p_tokens NULL: an
-- unfenced write; p_starts: 1-based index of the caller's first event; p_counts: how many).
-- p_types, p_payloads, p_keys: one entry per event, each caller's events contiguous.
-- p_keys is NULL when no event of the group carries a replay key.
-- Rows: per stored or replayed event (refusal NULL), or one row per refused caller
-- (refusal: 'not_found', 'terminal', 'lease_lost', 'replay_conflict'; detail: the state or
-- the conflicting key). payload is returned for replayed events only (the caller has the
-- others).
CREATE FUNCTION proclog.append_group(
    p_writer      text,
    p_process_ids text[],
    p_tokens      uuid[],
    p_starts      int[],
    p_counts      int[],
    p_types       text[],
    p_payloads    jsonb[],
    p_keys        text[]
) RETURNS TABLE (caller int, refusal text, detail text, seq bigint, event_type text,
                 payload jsonb, replay_key text, occurred_at timestamptz,
                 lease_generation bigint, replayed boolean, writer text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_caller     int;
    v_id         text;
    v_token      uuid;
    v_from       int;
    v_to         int;
    v_count      int;
    v_types      text[];
    v_payloads   jsonb[];
    v_keys       text[];
    v_last       bigint;
    v_generation bigint;
    v_stored     int;
    v_matched    int;
    v_key        text;
    v_reason     text;
    v_detail     text;
BEGIN
    FOR v_caller IN 1 .. cardinality(p_process_ids) LOOP
        v_id := p_process_ids[v_caller];
        v_token := p_tokens[v_caller];
        v_from := p_starts[v_caller];
        v_count := p_counts[v_caller];
        v_to := v_from + v_count - 1;
        v_types := p_types[v_from:v_to];
        v_payloads := p_payloads[v_from:v_to];
        v_keys := p_keys[v_from:v_to];
        -- A caller without any key takes the lock-free path, as in append_events.
        IF cardinality(array_remove(v_keys, NULL)) = 0 THEN
            v_keys := NULL;
        END IF;

        IF v_keys IS NOT NULL THEN
            -- As in append_events: keys are decided one retry at a time under the row lock.
            PERFORM 1 FROM proclog.processes p WHERE p.process_id = v_id FOR NO KEY UPDATE;
            IF NOT FOUND THEN
                RETURN QUERY SELECT v_caller, 'not_found'::text, NULL::text, NULL::bigint,
                    NULL::text, NULL::jsonb, NULL::text, NULL::timestamptz, NULL::bigint,
                    NULL::boolean, NULL::text;
                CONTINUE;
            END IF;
            SELECT count(e.seq),
                   count(e.seq) FILTER (WHERE e.event_type = r.t AND e.payload = r.p),
                   min(r.k) FILTER (WHERE e.seq IS NULL OR e.event_type <> r.t
                                       OR e.payload <> r.p)
              INTO v_stored, v_matched, v_key
              FROM unnest(v_types, v_payloads, v_keys) AS r(t, p, k)
              LEFT JOIN proclog.events e
                ON e.process_id = v_id AND e.replay_key = r.k;
            IF v_stored > 0 THEN
                IF v_matched = v_count THEN
                    RETURN QUERY
                        SELECT v_caller, NULL::text, NULL::text, e.seq, e.event_type,
                               e.payload, e.replay_key, e.occurred_at, e.lease_generation,
                               true, e.writer
                          FROM unnest(v_keys) WITH ORDINALITY AS r(k, ord)
                          JOIN proclog.events e
                            ON e.process_id = v_id AND e.replay_key = r.k
                         ORDER BY r.ord;
                ELSE
                    SELECT coalesce(v_key, min(e.replay_key)) INTO v_key
                      FROM proclog.events e
                     WHERE e.process_id = v_id AND e.replay_key = ANY (v_keys);
                    RETURN QUERY SELECT v_caller, 'replay_conflict'::text, v_key,
                        NULL::bigint, NULL::text, NULL::jsonb, NULL::text,
                        NULL::timestamptz, NULL::bigint, NULL::boolean, NULL::text;
                END IF;
                CONTINUE;
            END IF;
        END IF;

        UPDATE proclog.processes p
           SET last_seq = p.last_seq + v_count,
               status = CASE WHEN p.status = 'pending' THEN 'running' ELSE p.status END,
               updated_at = now()
         WHERE p.process_id = v_id
           AND p.terminal_state IS NULL
           AND proclog.fence_holds(v_token, p.lease_token, p.lease_expires_at)
        RETURNING p.last_seq, p.lease_generation INTO v_last, v_generation;
        IF NOT FOUND THEN
            SELECT w.reason, w.detail INTO v_reason, v_detail
              FROM proclog.write_refusal(v_id) w;
            RETURN QUERY SELECT v_caller, v_reason, v_detail, NULL::bigint, NULL::text,
                NULL::jsonb, NULL::text, NULL::timestamptz, NULL::bigint, NULL::boolean,
                NULL::text;
            CONTINUE;
        END IF;

        RETURN QUERY
            WITH inserted AS (
                INSERT INTO proclog.events AS e
                       (process_id, seq, event_type, payload, replay_key, writer,
                        lease_generation)
                SELECT v_id, v_last - v_count + r.ord, r.t, r.p, r.k, p_writer,
                       CASE WHEN v_token IS NULL THEN NULL ELSE v_generation END
                  FROM unnest(v_types, v_payloads, v_keys) WITH ORDINALITY AS r(t, p, k, ord)
                RETURNING e.seq, e.replay_key, e.occurred_at, e.lease_generation)
            SELECT v_caller, NULL::text, NULL::text, i.seq, NULL::text, NULL::jsonb,
                   i.replay_key, i.occurred_at, i.lease_generation, false, p_writer
              FROM inserted i ORDER BY i.seq;
    END LOOP;
END $$;

-- Version 1's append_events, now one caller of append_group (one copy of the rules), and
-- complete_process with its fence written through proclog.fence_holds.

CREATE OR REPLACE FUNCTION proclog.append_events(
    p_process_id  text,
    p_writer      text,
    p_lease_token uuid,
    p_types       text[],
    p_payloads    jsonb[],
    p_keys        text[]
) RETURNS TABLE (seq bigint, event_type text, payload jsonb, replay_key text,
                 occurred_at timestamptz, writer text, lease_generation bigint,
                 replayed boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_row record;
    v_ord int := 0;
BEGIN
    -- One caller of proclog.append_group: the rules live there, in one place; here a
    -- refusal is raised (same SQLSTATEs as version 1) and new events get their content back.
    FOR v_row IN
        SELECT * FROM proclog.append_group(p_writer, ARRAY[p_process_id], ARRAY[p_lease_token],
                                           ARRAY[1], ARRAY[cardinality(p_types)], p_types,
                                           p_payloads, p_keys)
    LOOP
        CASE v_row.refusal
            WHEN 'not_found' THEN
                RAISE EXCEPTION 'process % not found', p_process_id USING ERRCODE = 'PLNF0';
            WHEN 'terminal' THEN
                RAISE EXCEPTION 'process % is %', p_process_id, v_row.detail
                    USING ERRCODE = 'PLTM0', DETAIL = v_row.detail;
            WHEN 'lease_lost' THEN
                RAISE EXCEPTION 'lease on process % is lost', p_process_id
                    USING ERRCODE = 'PLLL0';
            WHEN 'replay_conflict' THEN
                RAISE EXCEPTION 'replay key % of process % is stored with different content',
                    v_row.detail, p_process_id USING ERRCODE = 'PLRC0', DETAIL = v_row.detail;
            ELSE
                NULL;
        END CASE;
        v_ord := v_ord + 1;
        seq := v_row.seq;
        event_type := coalesce(v_row.event_type, p_types[v_ord]);
        payload := coalesce(v_row.payload, p_payloads[v_ord]);
        replay_key := v_row.replay_key;
        occurred_at := v_row.occurred_at;
        writer := v_row.writer;
        lease_generation := v_row.lease_generation;
        replayed := v_row.replayed;
        RETURN NEXT;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION proclog.complete_process(
    p_process_id  text,
    p_writer      text,
    p_lease_token uuid,
    p_state       text,
    p_output      jsonb
) RETURNS SETOF proclog.processes
LANGUAGE plpgsql AS $$
DECLARE
    v_row proclog.processes;
BEGIN
    SELECT * INTO v_row FROM proclog.processes p WHERE p.process_id = p_process_id
        FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM proclog.refuse_write(p_process_id);
    END IF;
    IF v_row.terminal_state IS NOT NULL THEN
        IF v_row.terminal_state = p_state AND v_row.output = p_output THEN
            RETURN NEXT v_row;
            RETURN;
        END IF;
        RAISE EXCEPTION 'process % already ended as %', p_process_id, v_row.terminal_state
            USING ERRCODE = 'PLAT0', DETAIL = v_row.terminal_state;
    END IF;
    IF NOT proclog.fence_holds(p_lease_token, v_row.lease_token, v_row.lease_expires_at) THEN
        PERFORM proclog.refuse_write(p_process_id);
    END IF;

    INSERT INTO proclog.events
           (process_id, seq, event_type, payload, writer, lease_generation)
    VALUES (p_process_id, v_row.last_seq + 1, 'process.' || p_state, p_output, p_writer,
            CASE WHEN p_lease_token IS NULL THEN NULL ELSE v_row.lease_generation END);

    UPDATE proclog.processes p
       SET last_seq = p.last_seq + 1,
           status = p_state,
           terminal_state = p_state,
           terminal_seq = p.last_seq + 1,
           output = p_output,
           completed_at = now(),
           updated_at = now(),
           lease_owner = NULL,
           lease_token = NULL,
           lease_expires_at = NULL
     WHERE p.process_id = p_process_id
    RETURNING * INTO v_row;
    RETURN NEXT v_row;
END $$;
