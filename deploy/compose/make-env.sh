#!/bin/sh
# Writes `.env` next to docker-compose.yml with a fresh random secret for each password of the
# stack and for the API token (the stack refuses to start without them). An existing `.env`
# is kept. `.env` is ignored by git and by Docker's build context; keep it to yourself.
set -eu
cd "$(dirname "$0")/../.."
if [ -e .env ]; then
    echo ".env exists: kept as it is"
    exit 0
fi
secret() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
umask 077
cat > .env <<ENV
POSTGRES_PASSWORD=$(secret)
PROCLOG_OWNER_PASSWORD=$(secret)
PROCLOG_POD_PASSWORD=$(secret)
PROCLOG_READER_PASSWORD=$(secret)
PROCLOG_API_TOKEN=$(secret)
ENV
echo "wrote .env: database passwords and the API token (PROCLOG_API_TOKEN)"
