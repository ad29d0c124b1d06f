-- proclog schema version 12: child processes (CONTRACT §10).
--
-- A run may start other processes: each records the process that started it. The parent
-- learns that a child ended through a `process.message` of topic `process.child` in its own
-- log (`{child, state}`, replay key `proclog:child:<child id>`), written after the child's
-- terminal event; a run joining its children reads their terminal columns.
--
--   parent_id     the process whose run started this one; NULL for a process started from
--                 outside (set at registration, never changed)
--   has_children  set (on the parent's row, before the child is inserted) by the first
--                 registration of a child: a cancellation looks for children only then, so
--                 cancelling a process without children stays a statement on one process

ALTER TABLE proclog.processes
    ADD COLUMN parent_id text,
    ADD COLUMN has_children boolean NOT NULL DEFAULT false;

COMMENT ON COLUMN proclog.processes.parent_id IS 'the process whose run started this one (NULL: started from outside)';
COMMENT ON COLUMN proclog.processes.has_children IS 'a child was ever registered with this process as its parent';

-- A process's children, in the listing order (oldest first). Partial: most processes have no
-- parent, and they take no space in it.
CREATE INDEX processes_parent ON proclog.processes (parent_id, created_at, process_id)
    WHERE parent_id IS NOT NULL;
