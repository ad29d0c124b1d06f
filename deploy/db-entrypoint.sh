#!/bin/sh
# The database container of docker-compose.yml: a PostgreSQL cluster in /var/lib/proclog,
# created on first start with a `proclog` superuser and database, trusting the compose network.
# (A local demonstration setup: put a password and TLS in front of anything else.)
set -eu
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
data=/var/lib/proclog/data
mkdir -p /var/lib/proclog
chown postgres:postgres /var/lib/proclog
if [ ! -s "$data/PG_VERSION" ]; then
    su postgres -s /bin/sh -c "$bin/initdb -D $data -U proclog -A trust -E UTF8 >/dev/null"
    echo "host all all 0.0.0.0/0 trust" >> "$data/pg_hba.conf"
    su postgres -s /bin/sh -c "$bin/postgres -D $data -c listen_addresses= -k /tmp" &
    until su postgres -s /bin/sh -c "$bin/pg_isready -q -h /tmp -U proclog -d postgres"; do sleep 0.2; done
    su postgres -s /bin/sh -c "$bin/psql -q -h /tmp -U proclog -d postgres -c 'CREATE DATABASE proclog'"
    su postgres -s /bin/sh -c "$bin/pg_ctl -D $data -m fast -w stop >/dev/null"
fi
exec su postgres -s /bin/sh -c "exec $bin/postgres -D $data -c listen_addresses='*' -k /tmp"
