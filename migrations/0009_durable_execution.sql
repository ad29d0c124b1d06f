-- proclog schema version 9: durable execution (CONTRACT §9).
--
-- A process can wait without holding a pod: status `waiting`, no lease, with the time it
-- becomes runnable again and/or the message topic it waits for on its row. It can start
-- later than its registration, end at a deadline, and retry a failure after a backoff.
--
--   wake_at       not claimed before this instant (a delayed start, a timer, a retry's
--                 backoff, a receive's timeout); 'infinity' for a wait on a message alone;
--                 NULL: runnable now
--   waiting_for   the message topic a waiting process waits for; a message of that topic
--                 sets wake_at to now (the trigger below)
--   deadline      past it the process ends `failed` (reason "deadline exceeded"), whatever it
--                 is doing
--   retries       failure retries made (crash reruns are counted in attempts)
--   retry_policy  the retry policy given at registration (NULL: the engine kind's own)
--   trace_parent  the W3C traceparent of whatever registered it: its runs' spans continue it

ALTER TABLE proclog.processes
    ADD COLUMN wake_at timestamptz,
    ADD COLUMN waiting_for text,
    ADD COLUMN deadline timestamptz,
    ADD COLUMN retries integer NOT NULL DEFAULT 0,
    ADD COLUMN retry_policy jsonb,
    ADD COLUMN trace_parent text;

COMMENT ON COLUMN proclog.processes.wake_at IS 'not claimed before this instant (delayed start, timer, backoff, receive timeout; infinity: a message alone); NULL: runnable now';
COMMENT ON COLUMN proclog.processes.waiting_for IS 'the message topic a waiting process waits for';
COMMENT ON COLUMN proclog.processes.deadline IS 'past it the process ends failed with reason "deadline exceeded"';
COMMENT ON COLUMN proclog.processes.retries IS 'failure retries made (crash reruns count in attempts)';
COMMENT ON COLUMN proclog.processes.retry_policy IS 'retry policy given at registration; NULL: the engine kind''s own';
COMMENT ON COLUMN proclog.processes.trace_parent IS 'W3C traceparent whose trace its runs continue';

-- Claimable work is found through two indexes instead of one over every live process:
-- what is runnable, in the order it became runnable (its wake time, else its creation: so
-- a due timer and a new process are served first come, first served, and waiting processes,
-- however many, sit past now() where a claim's scan stops), and what is past its deadline.
DROP INDEX proclog.processes_runnable;
CREATE INDEX processes_runnable_since
    ON proclog.processes ((coalesce(wake_at, created_at)), process_id)
    WHERE terminal_state IS NULL AND disposition <> 'external';
CREATE INDEX processes_deadline ON proclog.processes (deadline)
    WHERE terminal_state IS NULL AND deadline IS NOT NULL;

-- The row rules, with `waiting`: a waiting process holds no lease.
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

-- Retries join the columns checked on update (a status change is checked by
-- processes_check_log; wake_at and waiting_for are under no rule).
DROP TRIGGER processes_check_update ON proclog.processes;
CREATE TRIGGER processes_check_update
    BEFORE UPDATE OF process_id, kind, input, disposition, created_at, lease_owner,
                     lease_token, lease_generation, lease_expires_at, terminal_state,
                     terminal_seq, output, completed_at, attempts, retries
    ON proclog.processes
    FOR EACH ROW EXECUTE FUNCTION proclog.check_process_row();

-- What the events a process's row records: its first start, its first cancellation request,
-- and now messages, which wake a process waiting for their topic.
CREATE OR REPLACE FUNCTION proclog.record_process_state() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_SCHEMA IS DISTINCT FROM 'proclog' OR TG_TABLE_NAME IS DISTINCT FROM 'events' THEN
        RAISE EXCEPTION 'proclog.record_process_state runs only as a trigger of proclog.events'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.event_type = 'process.started' THEN
        UPDATE proclog.processes SET started_at = NEW.occurred_at
         WHERE process_id = NEW.process_id AND started_at IS NULL;
    ELSIF NEW.event_type = 'process.cancel_requested' THEN
        UPDATE proclog.processes SET cancel_request = NEW.payload
         WHERE process_id = NEW.process_id AND cancel_request IS NULL;
    ELSE
        -- Whatever its status: a waiting process that a host or a canceller claimed for a
        -- moment still waits (its release makes it `waiting` again).
        UPDATE proclog.processes SET wake_at = now()
         WHERE process_id = NEW.process_id
           AND waiting_for = NEW.payload ->> 'topic'
           AND wake_at > now();
    END IF;
    RETURN NULL;
END $$;

DROP TRIGGER events_record_process_state ON proclog.events;
CREATE TRIGGER events_record_process_state
    AFTER INSERT ON proclog.events
    FOR EACH ROW
    WHEN (NEW.event_type IN ('process.started', 'process.cancel_requested', 'process.message'))
    EXECUTE FUNCTION proclog.record_process_state();

-- A run suspends its process: under its live lease, in one transaction, it appends
-- `process.waiting` (p_payload plus the wake time and topic) with the replay key p_key, sets
-- the row `waiting` with its wake time and awaited topic, counts a failure retry (p_retry)
-- and gives the lease back. The wake time is p_wake_at, else now() + p_delay_ms, else
-- 'infinity' (a message alone wakes it). It is now() instead when the process can go on at
-- once: a message of p_topic after seq p_after_seq is already in its log, or a cancellation
-- was requested (the next run acts on it).
--
-- Idempotent: a retry whose first try committed (p_key is stored) returns the row as it is.
-- Refusals as complete_process's: PLNF0 unknown, PLTM0 terminal, PLLL0 fence not live.
CREATE FUNCTION proclog.suspend_process(
    p_process_id  text,
    p_writer      text,
    p_lease_token uuid,
    p_key         text,
    p_wake_at     timestamptz,
    p_delay_ms    bigint,
    p_topic       text,
    p_after_seq   bigint,
    p_retry       boolean,
    p_payload     jsonb
) RETURNS SETOF proclog.processes
LANGUAGE plpgsql AS $$
DECLARE
    v_row  proclog.processes;
    v_wake timestamptz;
BEGIN
    SELECT * INTO v_row FROM proclog.processes p WHERE p.process_id = p_process_id
        FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM proclog.refuse_write(p_process_id);
    END IF;
    IF EXISTS (SELECT 1 FROM proclog.events e
                WHERE e.process_id = p_process_id AND e.replay_key = p_key
                  AND e.event_type = 'process.waiting') THEN
        RETURN NEXT v_row;
        RETURN;
    END IF;
    IF v_row.terminal_state IS NOT NULL OR p_lease_token IS NULL
       OR NOT proclog.fence_holds(p_lease_token, v_row.lease_token, v_row.lease_expires_at) THEN
        PERFORM proclog.refuse_write(p_process_id);
        RAISE EXCEPTION 'lease on process % is lost', p_process_id USING ERRCODE = 'PLLL0';
    END IF;

    v_wake := coalesce(p_wake_at, now() + p_delay_ms * interval '1 millisecond',
                       'infinity'::timestamptz);
    IF v_row.cancel_request IS NOT NULL
       OR (p_topic IS NOT NULL AND EXISTS (
             SELECT 1 FROM proclog.events e
              WHERE e.process_id = p_process_id AND e.seq > p_after_seq
                AND e.event_type = 'process.message' AND e.payload ->> 'topic' = p_topic)) THEN
        v_wake := least(v_wake, now());
    END IF;

    INSERT INTO proclog.events
           (process_id, seq, event_type, payload, replay_key, writer, lease_generation)
    VALUES (p_process_id, v_row.last_seq + 1, 'process.waiting',
            p_payload || jsonb_build_object(
                'wake_at', CASE WHEN isfinite(v_wake) THEN to_jsonb(v_wake) END,
                'topic', p_topic),
            p_key, p_writer, v_row.lease_generation);

    UPDATE proclog.processes p
       SET last_seq = p.last_seq + 1,
           status = 'waiting',
           wake_at = v_wake,
           waiting_for = p_topic,
           retries = p.retries + CASE WHEN p_retry THEN 1 ELSE 0 END,
           lease_owner = NULL,
           lease_token = NULL,
           lease_expires_at = NULL,
           updated_at = now()
     WHERE p.process_id = p_process_id
    RETURNING * INTO v_row;
    RETURN NEXT v_row;
END $$;

REVOKE ALL ON FUNCTION proclog.suspend_process(text, text, uuid, text, timestamptz, bigint,
                                               text, bigint, boolean, jsonb) FROM PUBLIC;
