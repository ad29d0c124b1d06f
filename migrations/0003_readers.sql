-- proclog schema version 3: read-only roles for people who query the logs over SQL.

-- Roles given read access with `proclog grant-reader ROLE`. The migrator grants SELECT on
-- every proclog table to each of them again after every migration, so tables added later are
-- readable too, whichever role runs the migrations.
CREATE TABLE proclog.readers (
    role_name  text        NOT NULL PRIMARY KEY,
    granted_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE proclog.readers IS 'roles with read-only access to the proclog schema (proclog grant-reader)';
