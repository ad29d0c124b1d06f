-- proclog schema version 1: processes, their event logs, and the append/complete functions.
--
-- Every table is keyed by process_id first, so the schema can be distributed by process id.
-- Times come from the database clock (now()); payloads are jsonb.

CREATE SCHEMA IF NOT EXISTS proclog;

-- One row per process. The row is also the per-process append lock and sequence counter
-- (last_seq), the lease (lease_*), and the durable terminal column (terminal_state,
-- terminal_seq, output, completed_at).
CREATE TABLE proclog.processes (
    process_id       text        NOT NULL PRIMARY KEY,
    kind             text        NOT NULL,
    input            jsonb       NOT NULL,
    disposition      text        NOT NULL
                     CHECK (disposition IN ('rerun', 'abandon', 'external')),
    status           text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'completed', 'failed',
                                       'cancelled', 'abandoned')),
    last_seq         bigint      NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,
    lease_token      uuid,
    lease_generation bigint      NOT NULL DEFAULT 0 CHECK (lease_generation >= 0),
    lease_expires_at timestamptz,
    terminal_state   text
                     CHECK (terminal_state IN ('completed', 'failed', 'cancelled', 'abandoned')),
    terminal_seq     bigint,
    output           jsonb,
    completed_at     timestamptz,
    -- The terminal column is all set or all NULL, and agrees with status.
    CONSTRAINT terminal_column_whole CHECK (
        (terminal_state IS NULL) = (terminal_seq IS NULL)
        AND (terminal_state IS NULL) = (output IS NULL)
        AND (terminal_state IS NULL) = (completed_at IS NULL)),
    CONSTRAINT terminal_matches_status CHECK (
        terminal_state IS NULL AND status IN ('pending', 'running')
        OR terminal_state = status),
    -- A terminal process holds no lease, and its terminal event is its last event.
    CONSTRAINT terminal_is_sealed CHECK (
        terminal_state IS NULL OR (lease_token IS NULL AND terminal_seq = last_seq)),
    CONSTRAINT lease_whole CHECK (
        (lease_token IS NULL) = (lease_owner IS NULL)
        AND (lease_token IS NULL) = (lease_expires_at IS NULL))
) WITH (fillfactor = 80);  -- room for HOT updates of last_seq on every append

COMMENT ON TABLE proclog.processes IS 'One row per process: state, sequence counter, lease and terminal column.';
COMMENT ON COLUMN proclog.processes.last_seq IS 'seq of the last event of the log (0 when empty)';
COMMENT ON COLUMN proclog.processes.lease_generation IS 'generation of the latest lease ever granted; never decreases';
COMMENT ON COLUMN proclog.processes.terminal_state IS 'how the process ended; NULL until then (the durable truth of completion)';
COMMENT ON COLUMN proclog.processes.terminal_seq IS 'seq of the terminal event, always the last event';

CREATE INDEX processes_by_status ON proclog.processes (status, created_at, process_id);
CREATE INDEX processes_by_kind ON proclog.processes (kind, created_at, process_id);
CREATE INDEX processes_by_created ON proclog.processes (created_at, process_id);
CREATE INDEX processes_terminal_by_completion ON proclog.processes (completed_at)
    WHERE terminal_state IS NOT NULL;

-- The append-only event logs: seq is 1, 2, 3, ... per process, dense.
CREATE TABLE proclog.events (
    process_id       text        NOT NULL
                     REFERENCES proclog.processes (process_id) ON DELETE CASCADE,
    seq              bigint      NOT NULL CHECK (seq > 0),
    event_type       text        NOT NULL,
    payload          jsonb       NOT NULL,
    replay_key       text,
    occurred_at      timestamptz NOT NULL DEFAULT now(),
    writer           text        NOT NULL,
    lease_generation bigint,
    PRIMARY KEY (process_id, seq)
);

COMMENT ON TABLE proclog.events IS 'Append-only event log of every process; (process_id, seq) is dense from 1.';
COMMENT ON COLUMN proclog.events.writer IS 'pod id of the writer';
COMMENT ON COLUMN proclog.events.lease_generation IS 'generation of the lease a fenced write was made under; NULL when unfenced';

CREATE UNIQUE INDEX events_by_replay_key ON proclog.events (process_id, replay_key)
    WHERE replay_key IS NOT NULL;

-- Refuses a write to a process that the caller's UPDATE did not match, with the reason.
-- SQLSTATEs: PLNF0 not found, PLTM0 terminal (DETAIL = state), PLLL0 lease lost.
CREATE FUNCTION proclog.refuse_write(p_process_id text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_state text;
BEGIN
    SELECT p.terminal_state INTO v_state FROM proclog.processes p
     WHERE p.process_id = p_process_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'process % not found', p_process_id USING ERRCODE = 'PLNF0';
    ELSIF v_state IS NOT NULL THEN
        RAISE EXCEPTION 'process % is %', p_process_id, v_state
            USING ERRCODE = 'PLTM0', DETAIL = v_state;
    ELSE
        RAISE EXCEPTION 'lease on process % is lost', p_process_id USING ERRCODE = 'PLLL0';
    END IF;
END $$;

-- Appends a batch of events to one process in one transaction: all or nothing, consecutive
-- seqs taken from processes.last_seq under that row's lock (no store-wide lock or counter).
-- p_lease_token, when not NULL, fences the write: it must be the current live lease.
-- p_keys is NULL when no request of the batch carries a replay key (the common, lock-free path).
-- Replay (any key of the batch already stored): returns the stored events with
-- replayed = true when every request's key is stored with the same type and payload,
-- otherwise raises PLRC0 (DETAIL = the key).
CREATE FUNCTION proclog.append_events(
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
    v_count      int := cardinality(p_types);
    v_last       bigint;
    v_generation bigint;
    v_stored     int;
    v_matched    int;
    v_key        text;
BEGIN
    IF p_keys IS NOT NULL THEN
        -- Keys are decided one retry at a time: lock the process row first.
        PERFORM 1 FROM proclog.processes p WHERE p.process_id = p_process_id
            FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            PERFORM proclog.refuse_write(p_process_id);
        END IF;
        SELECT count(e.seq),
               count(e.seq) FILTER (WHERE e.event_type = r.t AND e.payload = r.p),
               min(r.k) FILTER (WHERE e.seq IS NULL OR e.event_type <> r.t
                                   OR e.payload <> r.p)
          INTO v_stored, v_matched, v_key
          FROM unnest(p_types, p_payloads, p_keys) AS r(t, p, k)
          LEFT JOIN proclog.events e
            ON e.process_id = p_process_id AND e.replay_key = r.k;
        IF v_stored > 0 THEN
            IF v_matched = v_count THEN
                RETURN QUERY
                    SELECT e.seq, e.event_type, e.payload, e.replay_key, e.occurred_at,
                           e.writer, e.lease_generation, true
                      FROM unnest(p_keys) WITH ORDINALITY AS r(k, ord)
                      JOIN proclog.events e
                        ON e.process_id = p_process_id AND e.replay_key = r.k
                     ORDER BY r.ord;
                RETURN;
            END IF;
            SELECT coalesce(v_key, min(e.replay_key)) INTO v_key
              FROM proclog.events e
             WHERE e.process_id = p_process_id AND e.replay_key = ANY (p_keys);
            RAISE EXCEPTION 'replay key % of process % is stored with different content',
                v_key, p_process_id USING ERRCODE = 'PLRC0', DETAIL = v_key;
        END IF;
    END IF;

    UPDATE proclog.processes p
       SET last_seq = p.last_seq + v_count,
           status = CASE WHEN p.status = 'pending' THEN 'running' ELSE p.status END,
           updated_at = now()
     WHERE p.process_id = p_process_id
       AND p.terminal_state IS NULL
       AND (p_lease_token IS NULL
            OR (p.lease_token = p_lease_token AND p.lease_expires_at > now()))
    RETURNING p.last_seq, p.lease_generation INTO v_last, v_generation;
    IF NOT FOUND THEN
        PERFORM proclog.refuse_write(p_process_id);
    END IF;

    RETURN QUERY
        WITH inserted AS (
            INSERT INTO proclog.events AS e
                   (process_id, seq, event_type, payload, replay_key, writer, lease_generation)
            SELECT p_process_id, v_last - v_count + r.ord, r.t, r.p, r.k, p_writer,
                   CASE WHEN p_lease_token IS NULL THEN NULL ELSE v_generation END
              FROM unnest(p_types, p_payloads, p_keys) WITH ORDINALITY AS r(t, p, k, ord)
            RETURNING e.seq, e.event_type, e.payload, e.replay_key, e.occurred_at, e.writer,
                      e.lease_generation)
        SELECT i.seq, i.event_type, i.payload, i.replay_key, i.occurred_at, i.writer,
               i.lease_generation, false
          FROM inserted i ORDER BY i.seq;
END $$;

-- Ends a process in one transaction: appends process.<state> with the output as payload,
-- fills the terminal column and releases the lease. The identical completion of a terminal
-- process returns its row; any other is PLAT0 (DETAIL = state). A fence that is not the
-- current live lease is PLLL0.
CREATE FUNCTION proclog.complete_process(
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
    IF p_lease_token IS NOT NULL
       AND (v_row.lease_token IS DISTINCT FROM p_lease_token
            OR v_row.lease_expires_at <= now()) THEN
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
