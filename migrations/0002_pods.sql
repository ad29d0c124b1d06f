-- proclog schema version 2: what pods need to run processes.

-- How many times a pod has started running the process (1 on the first run, +1 per rerun).
ALTER TABLE proclog.processes ADD COLUMN attempts integer NOT NULL DEFAULT 0
    CHECK (attempts >= 0);
COMMENT ON COLUMN proclog.processes.attempts IS 'runs started by pods (the attempt number of the latest run)';

-- Runnable processes in claim order: not terminal, not external. Pods claim from it with
-- FOR UPDATE SKIP LOCKED.
CREATE INDEX processes_runnable ON proclog.processes (created_at, process_id)
    WHERE terminal_state IS NULL AND disposition <> 'external';

-- Leases of runnable processes by expiry: pods sleep until the next one may lapse, so the work
-- of a dead pod is taken over as soon as its leases expire.
CREATE INDEX processes_lease_expiry ON proclog.processes (lease_expires_at)
    WHERE terminal_state IS NULL AND disposition <> 'external' AND lease_expires_at IS NOT NULL;
