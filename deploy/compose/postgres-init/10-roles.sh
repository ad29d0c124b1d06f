#!/bin/sh
# First start of the compose database: the roles of least privilege (README, Security).
#   proclog_owner   owns the database and the proclog schema; runs the migrations (the
#                   `migrate` service); not a superuser.
#   proclog_pod     what the pods connect as: proclog's statements and nothing else
#                   (`proclog migrate --writer-role` grants it after migrating).
#   proclog_reader  people who query events over SQL: SELECT only (`--reader-role`).
# Nobody else may connect to the database or create temporary tables in it.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set owner_password="$PROCLOG_OWNER_PASSWORD" \
    --set pod_password="$PROCLOG_POD_PASSWORD" \
    --set reader_password="$PROCLOG_READER_PASSWORD" \
    --set db="$POSTGRES_DB" <<'SQL'
CREATE ROLE proclog_owner LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'owner_password';
CREATE ROLE proclog_pod LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'pod_password';
CREATE ROLE proclog_reader LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'reader_password';
ALTER DATABASE :"db" OWNER TO proclog_owner;
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO proclog_pod, proclog_reader;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL
