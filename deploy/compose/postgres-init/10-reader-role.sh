#!/bin/sh
# First start of the compose database: the read-only role `proclog_reader` for people who
# query events over SQL. The pods grant it SELECT on the proclog schema after migrating
# (PROCLOG_READER_ROLE), so it can read every table and write none.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set reader_password="${PROCLOG_READER_PASSWORD:-reader-local}" <<'SQL'
CREATE ROLE proclog_reader LOGIN PASSWORD :'reader_password';
SQL
