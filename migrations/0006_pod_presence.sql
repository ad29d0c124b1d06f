-- proclog schema version 6: which pods exist, on the database clock.
--
-- A pod upserts its row when it starts and then heartbeats it; a pod that stops cleanly marks
-- itself draining, then stopped. A pod killed outright leaves its row behind with an old
-- heartbeat: proclog.pod_status calls it 'gone' once three heartbeat periods have passed.
-- Rows of pods stopped or gone for a week are pruned by the pods themselves.

CREATE TABLE proclog.pods (
    pod_id           text        NOT NULL PRIMARY KEY,
    incarnation      uuid        NOT NULL,
    address          text,
    version          text        NOT NULL,
    concurrency      integer     NOT NULL CHECK (concurrency >= 0),
    state            text        NOT NULL CHECK (state IN ('running', 'draining', 'stopped')),
    started_at       timestamptz NOT NULL DEFAULT now(),
    heartbeat_at     timestamptz NOT NULL DEFAULT now(),
    heartbeat_every  interval    NOT NULL CHECK (heartbeat_every > interval '0'),
    stopped_at       timestamptz,
    CONSTRAINT stopped_when_stopped CHECK ((state = 'stopped') = (stopped_at IS NOT NULL))
);

COMMENT ON TABLE proclog.pods IS 'Pods that ran against this database: one row per pod id, heartbeated on the database clock.';
COMMENT ON COLUMN proclog.pods.incarnation IS 'random id of the pod process that wrote the row; a restart under the same pod id changes it';
COMMENT ON COLUMN proclog.pods.address IS 'where the pod serves its HTTP API and console, as it reports it';
COMMENT ON COLUMN proclog.pods.heartbeat_every IS 'the pod''s heartbeat period; the row is stale after three';

-- Each pod with its liveness as of now(): 'running' or 'draining' while it heartbeats,
-- 'stopped' after a clean stop, 'gone' once its heartbeat is older than three periods, plus
-- the live leases it holds (its running processes).
CREATE VIEW proclog.pod_status AS
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
       (SELECT count(*) FROM proclog.processes l
         WHERE l.lease_owner = p.pod_id AND l.lease_expires_at > now()
           AND l.terminal_state IS NULL AND l.disposition <> 'external'
           AND l.lease_expires_at IS NOT NULL) AS leases_held
  FROM proclog.pods p;

COMMENT ON VIEW proclog.pod_status IS 'pods with their liveness (running, draining, stopped, gone) and live leases held';
