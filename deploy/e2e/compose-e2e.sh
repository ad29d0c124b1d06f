#!/usr/bin/env bash
# The compose end-to-end test: the repository's own docker-compose.yml, with only image names
# and host ports overridden, brought up from images made on this machine (no registry).
#
#   deploy/e2e/compose-e2e.sh              # base images (cached), image, then the checks
#
# It registers processes, kills (SIGKILL) the pod that owns a running one, restarts the
# database, and checks over psql that every process ended in the state its engine decided
# with a gapless log, that the killed pod's work was taken over, that the killed pod stayed
# down, and that the read-only role reads and cannot write. Then it brings the stack up from
# nothing PROCLOG_E2E_UPS times (default 10) and requires every pod healthy each time (the
# startup race). Everything it started is removed at the end, also on failure.
#
# Environment: COMPOSE (default: docker-compose, else `docker compose`), PROCLOG_E2E_UPS,
# PROCLOG_E2E_BINARY (default target/release/proclog, built when absent).
set -euo pipefail
cd "$(dirname "$0")/../.."
started=$(date +%s)

if [ -z "${COMPOSE:-}" ]; then
    if command -v docker-compose >/dev/null; then COMPOSE=docker-compose; else COMPOSE="docker compose"; fi
fi
ups=${PROCLOG_E2E_UPS:-10}
binary=${PROCLOG_E2E_BINARY:-target/release/proclog}

export COMPOSE_PROJECT_NAME=proclog-e2e-$$
export PROCLOG_IMAGE=proclog-e2e/proclog:test
export POSTGRES_IMAGE=proclog-e2e/postgres:15
export E2E_DEBIAN_IMAGE=proclog-e2e/debian:bookworm
export E2E_POSTGRES_IMAGE=$POSTGRES_IMAGE
# Free host ports on loopback: one for Postgres, a range of nine for the pods.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export PROCLOG_BIND=127.0.0.1
export POSTGRES_PORT=$(free_port)
base=$((20000 + RANDOM % 30000))
export PROCLOG_PORTS=$base-$((base + 8))
# The stack's secrets, fresh for this run (they win over a developer's .env), and nothing else
# a developer's shell could bring in that the checks depend on.
secret() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }
export POSTGRES_PASSWORD=$(secret) PROCLOG_OWNER_PASSWORD=$(secret) PROCLOG_POD_PASSWORD=$(secret)
export PROCLOG_READER_PASSWORD=$(secret) PROCLOG_API_TOKEN=$(secret)
export PROCLOG_POD_ID=

compose() { $COMPOSE "$@"; }
log() { printf '[e2e %4ss] %s\n' "$(($(date +%s) - started))" "$*"; }
fail() {
    log "FAILED: $*"
    compose ps || true
    compose logs --tail=40 || true
    exit 1
}
cleanup() {
    compose down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true
}
trap cleanup EXIT

# --- images ------------------------------------------------------------------------------
log "base images"
deploy/e2e/base-images.sh
if [ ! -x "$binary" ]; then
    cargo build --release --locked --bin proclog
fi
mkdir -p target/docker
cp "$binary" target/docker/proclog
strip target/docker/proclog 2>/dev/null || true
log "proclog image (Dockerfile, --target prebuilt, RUNTIME_IMAGE=$E2E_DEBIAN_IMAGE)"
docker build -q --target prebuilt --build-arg RUNTIME_IMAGE="$E2E_DEBIAN_IMAGE" \
    --build-arg VERSION="$("$binary" --version | awk '{ print $2 }')" \
    -t "$PROCLOG_IMAGE" . >/dev/null
# The image this replaced (same tag) is left dangling: remove it.
docker image prune -f --filter "label=org.opencontainers.image.title=proclog" >/dev/null
image_mb=$(docker image inspect -f '{{.Size}}' "$PROCLOG_IMAGE" | awk '{ printf "%.0f", $1 / 1e6 }')
log "image $PROCLOG_IMAGE: $image_mb MB"

# --- helpers -----------------------------------------------------------------------------
sql() { compose exec -T postgres psql -U postgres -d proclog -v ON_ERROR_STOP=1 -Atqc "$1"; }
# `sql` as another role, over TCP with its password.
sql_as() {
    compose exec -T -e PGPASSWORD="$2" postgres \
        psql -h 127.0.0.1 -U "$1" -d proclog -v ON_ERROR_STOP=1 -Atqc "$3"
}
pod_containers() { compose ps -q pod; }
# Waits until `count` pod containers are running and healthy.
wait_healthy() {
    local count=$1 deadline=$(($(date +%s) + ${2:-180}))
    while :; do
        local healthy=0 id
        for id in $(pod_containers); do
            [ "$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")" = healthy ] \
                && healthy=$((healthy + 1))
        done
        [ "$healthy" -ge "$count" ] && return 0
        [ "$(date +%s)" -ge "$deadline" ] && return 1
        sleep 1
    done
}
pod_url() { echo "http://$(compose port --index="${1:-1}" pod 8080)"; }
container_of_pod() {
    # A pod's id is "<host name>-<pid>"; the host name is the container's.
    local id
    for id in $(pod_containers); do
        [ "$(docker inspect -f '{{.Config.Hostname}}' "$id")-1" = "$1" ] && { echo "$id"; return; }
    done
}

# --- the walkthrough ---------------------------------------------------------------------
log "up ($COMPOSE, project $COMPOSE_PROJECT_NAME, pods on $PROCLOG_PORTS, postgres on $POSTGRES_PORT)"
compose up -d >/dev/null 2>&1 || fail "compose up"
wait_healthy 3 || fail "three healthy pods"
url=$(pod_url 1)
log "3 pods healthy; API at $url"

proclog() { "$binary" "$@" --url "$url" >/dev/null; }
for i in $(seq 1 12); do
    proclog start steps --id "e2e-rerun-$i" --input '{"steps": 12, "delay_ms": 400}' --disposition rerun
    proclog start steps --id "e2e-abandon-$i" --input '{"steps": 12, "delay_ms": 400}' --disposition abandon
done
for i in $(seq 1 4); do
    proclog start fail --id "e2e-fail-$i" --input '{"message": "the engine decided so"}'
done
total=28

# The owner of a running `rerun` process that has made progress.
victim_pod=""
for _ in $(seq 1 120); do
    victim_pod=$(sql "SELECT p.lease_owner FROM proclog.processes p
                       WHERE p.status = 'running' AND p.process_id LIKE 'e2e-rerun-%'
                         AND p.last_seq >= 3 LIMIT 1")
    [ -n "$victim_pod" ] && break
    sleep 0.5
done
[ -n "$victim_pod" ] || fail "no process got running"
victim=$(container_of_pod "$victim_pod")
[ -n "$victim" ] || fail "no container for pod $victim_pod"
owned=$(sql "SELECT string_agg(process_id, ' ') FROM proclog.processes
              WHERE lease_owner = '$victim_pod' AND terminal_state IS NULL")
log "docker kill $victim_pod (SIGKILL), which runs: $owned"
docker kill "$victim" >/dev/null

log "restarting the database"
compose restart postgres >/dev/null 2>&1 || fail "restart postgres"

deadline=$(($(date +%s) + 240))
while :; do
    open=$(sql "SELECT count(*) FROM proclog.processes WHERE terminal_state IS NULL" 2>/dev/null || echo "?")
    [ "$open" = 0 ] && break
    [ "$(date +%s)" -ge "$deadline" ] && fail "$open processes never ended"
    sleep 1
done
log "all $total processes ended"

check() {
    local what=$1 query=$2 expected=$3 got
    got=$(sql "$query")
    [ "$got" = "$expected" ] || fail "$what: expected $expected, got: $got"
    log "ok: $what"
}
check "every process is registered" \
    "SELECT count(*) FROM proclog.processes WHERE process_id LIKE 'e2e-%'" "$total"
check "every log is dense from 1" \
    "SELECT count(*) FROM (SELECT process_id FROM proclog.events GROUP BY process_id
                            HAVING min(seq) <> 1 OR max(seq) <> count(*)) gaps" 0
check "exactly one terminal event per process, and it is the last" \
    "SELECT count(*) FROM proclog.processes p
      WHERE (SELECT count(*) FROM proclog.events e WHERE e.process_id = p.process_id
               AND e.event_type IN ('process.completed', 'process.failed',
                                    'process.cancelled', 'process.abandoned')) <> 1
         OR p.terminal_seq <> (SELECT max(seq) FROM proclog.events e WHERE e.process_id = p.process_id)" 0
check "rerun processes completed (the killed pod's ones rerun elsewhere)" \
    "SELECT count(*) FROM proclog.processes WHERE process_id LIKE 'e2e-rerun-%' AND terminal_state = 'completed'" 12
check "fail processes failed, as their engine decided" \
    "SELECT count(*) FROM proclog.processes WHERE process_id LIKE 'e2e-fail-%' AND terminal_state = 'failed'" 4
check "abandon processes completed, or abandoned only when their owner was killed" \
    "SELECT count(*) FROM proclog.processes WHERE process_id LIKE 'e2e-abandon-%'
        AND NOT (terminal_state = 'completed'
                 OR terminal_state = 'abandoned' AND output->>'lost_owner' = '$victim_pod')" 0
check "no abandon process started twice" \
    "SELECT count(*) FROM (SELECT process_id FROM proclog.events
                            WHERE process_id LIKE 'e2e-abandon-%' AND event_type = 'process.started'
                            GROUP BY process_id HAVING count(*) > 1) twice" 0
for id in $owned; do
    case "$id" in
        e2e-rerun-*)
            check "$id was taken over from $victim_pod by another pod" \
                "SELECT count(*) FROM proclog.events WHERE process_id = '$id' AND event_type = 'process.started'
                    AND writer <> '$victim_pod' AND payload->'recovered_from'->>'owner' = '$victim_pod'" 1 ;;
        e2e-abandon-*)
            check "$id was abandoned with the killed pod as evidence" \
                "SELECT terminal_state || ' ' || (output->>'lost_owner') FROM proclog.processes WHERE process_id = '$id'" \
                "abandoned $victim_pod" ;;
    esac
done
[ "$(docker inspect -f '{{.State.Running}}' "$victim")" = false ] \
    || fail "the killed pod was restarted (restart: unless-stopped must leave it down)"
log "ok: the killed pod stayed down"

# The pods table and the console: the killed pod is gone, the others running.
check "the killed pod is shown as gone" \
    "SELECT status FROM proclog.pod_status WHERE pod_id = '$victim_pod'" "gone"
check "the two other pods are running" \
    "SELECT count(*) FROM proclog.pod_status WHERE status = 'running'" "2"
console=""
jar=$(mktemp)
for index in 1 2 3; do
    base_url=$(pod_url "$index" 2>/dev/null) || continue
    # The console asks for the token once, then keeps a session cookie.
    curl -fsS --max-time 5 -c "$jar" -o /dev/null --data-urlencode "token=$PROCLOG_API_TOKEN" \
        "$base_url/ui/login" 2>/dev/null || continue
    page=$(curl -fsS --max-time 5 -b "$jar" "$base_url/" 2>/dev/null) || continue
    console=$page
    live_url=$base_url
    break
done
rm -f "$jar"
[ -n "$console" ] || fail "no pod served the console"
grep -q "data-pod=\"$victim_pod\" data-status=\"gone\"" <<<"$console" \
    || fail "the console does not show $victim_pod as gone"
log "ok: proclog.pod_status and the console show $victim_pod as gone"

reader() { sql_as proclog_reader "$PROCLOG_READER_PASSWORD" "$1"; }
[ "$(reader "SELECT count(*) FROM proclog.processes WHERE process_id LIKE 'e2e-%'")" = "$total" ] \
    || fail "the reader role cannot read"
if reader "DELETE FROM proclog.events" >/dev/null 2>&1; then fail "the reader role could write"; fi
log "ok: proclog_reader reads and cannot write"
check "the pods connect as proclog_pod, and only as it" \
    "SELECT string_agg(DISTINCT usename, ',') FROM pg_stat_activity WHERE application_name LIKE 'proclog-%'" \
    "proclog_pod"
if sql_as proclog_pod "$PROCLOG_POD_PASSWORD" "CREATE TABLE proclog.mine (x int)" >/dev/null 2>&1; then
    fail "the pods' role could change the schema"
fi
if sql_as proclog_pod "$PROCLOG_POD_PASSWORD" "TRUNCATE proclog.events" >/dev/null 2>&1; then
    fail "the pods' role could truncate the log"
fi
log "ok: proclog_pod cannot change the schema"
status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$live_url/v1/processes/e2e-fail-1" || true)
[ "$status" = 401 ] || fail "the API answered $status without the token"
log "ok: the API needs the token"

docker start "$victim" >/dev/null
wait_healthy 3 || fail "the killed pod did not come back healthy"
log "ok: the killed pod is back"
compose up -d --scale pod=5 >/dev/null 2>&1 || fail "up --scale pod=5"
wait_healthy 5 || fail "five healthy pods after --scale pod=5"
log "ok: --scale pod=5 gives five healthy pods, each on its own host port"
walkthrough=$(($(date +%s) - started))

# --- the startup race --------------------------------------------------------------------
compose down -v --timeout 10 >/dev/null 2>&1
for round in $(seq 1 "$ups"); do
    t0=$(date +%s)
    compose up -d >/dev/null 2>&1 || fail "up #$round"
    wait_healthy 3 120 || fail "up #$round: pods not healthy"
    restarts=0
    for id in $(pod_containers); do
        restarts=$((restarts + $(docker inspect -f '{{.RestartCount}}' "$id")))
    done
    log "up #$round: 3 pods healthy in $(($(date +%s) - t0)) s (container restarts: $restarts)"
    [ "$restarts" = 0 ] || fail "up #$round: a pod had to be restarted"
    compose down -v --timeout 10 >/dev/null 2>&1
done

log "PASSED: image $image_mb MB, walkthrough ${walkthrough} s, $ups fresh ups, total $(($(date +%s) - started)) s"
