#!/usr/bin/env bash
# A non-Rust host driving an `external` process over HTTP with curl.
#
# Pods never run an `external` process: its client registers it, appends its events and
# completes it. Every append here carries a replay key, so a client that lost an answer (a
# timeout, a dropped connection) simply sends the same request again and gets the stored event
# back (HTTP 200, "replayed": true, same seq) instead of a second event (HTTP 201).
#
# Needs a running pod, e.g. `cargo run --release -- up --pods 1` in another terminal, at
# PROCLOG_URL (default http://127.0.0.1:8080); PROCLOG_API_TOKEN is sent as a bearer token when
# set. Uses curl, and jq when present (plain JSON otherwise).
#
#   examples/external_over_http.sh
#
# Exits 0 when every step answered as expected, non-zero on the first failure (curl -f fails on
# any HTTP error status).

set -euo pipefail

URL="${PROCLOG_URL:-http://127.0.0.1:8080}"
URL="${URL%/}"
ID="http-demo-$(date +%s)-$$"

AUTH=()
if [[ -n "${PROCLOG_API_TOKEN:-}" ]]; then
  AUTH=(-H "Authorization: Bearer ${PROCLOG_API_TOKEN}")
fi

# Pretty-prints JSON on stdin with jq when it is installed.
show() {
  if command -v jq >/dev/null 2>&1; then
    jq .
  else
    cat
  fi
}

# Reads a top-level field of the JSON on stdin: jq when present, else a crude sed for the
# simple values used below.
field() {
  if command -v jq >/dev/null 2>&1; then
    jq -r "$1"
  else
    local name="${1##*.}"
    sed -E -n "s/.*\"${name}\":(\"[^\"]*\"|[^,}]*).*/\1/p" | head -n 1 | tr -d '"'
  fi
}

# call METHOD PATH [JSON]: the HTTP status goes to STATUS, the body to BODY.
STATUS=
BODY=
call() {
  local method="$1" path="$2" body="${3:-}" response
  local args=(-fsS -X "$method" -w '\n%{http_code}' ${AUTH[@]+"${AUTH[@]}"})
  if [[ -n "$body" ]]; then
    args+=(-H 'Content-Type: application/json' --data "$body")
  fi
  response="$(curl "${args[@]}" "${URL}${path}")"
  STATUS="${response##*$'\n'}"
  BODY="${response%$'\n'*}"
}

expect_status() {
  if [[ "$STATUS" != "$1" ]]; then
    echo "expected HTTP $1, got $STATUS" >&2
    exit 1
  fi
}

echo "== pod at $URL"
curl -fsS "$URL/healthz" >/dev/null || {
  echo "no pod answers at $URL (start one: cargo run --release -- up --pods 1)" >&2
  exit 1
}

echo "== register $ID (disposition external)"
call POST /v1/processes \
  "{\"id\": \"$ID\", \"kind\": \"http-demo\", \"input\": {\"order\": 7}, \"disposition\": \"external\"}"
expect_status 201
echo "status: $(printf '%s\n' "$BODY" | field .status)"

echo "== append 'reserved' with replay key 'reserve'"
EVENT='{"event_type": "reserved", "payload": {"sku": "A-1", "qty": 2}, "replay_key": "reserve"}'
call POST "/v1/processes/$ID/events" "$EVENT"
expect_status 201
FIRST_SEQ="$(printf '%s\n' "$BODY" | field .event.seq)"
echo "HTTP $STATUS, seq $FIRST_SEQ"

echo "== the same append again (a retry after a lost answer)"
call POST "/v1/processes/$ID/events" "$EVENT"
expect_status 200
REPLAYED="$(printf '%s\n' "$BODY" | field .replayed)"
SEQ="$(printf '%s\n' "$BODY" | field .event.seq)"
echo "HTTP $STATUS, replayed $REPLAYED, seq $SEQ"
if [[ "$REPLAYED" != "true" || "$SEQ" != "$FIRST_SEQ" ]]; then
  echo "expected the stored event back" >&2
  exit 1
fi

echo "== append a batch of two, each with its key (all or nothing)"
call POST "/v1/processes/$ID/events" \
  '{"events": [
     {"event_type": "charged", "payload": {"amount": 1400}, "replay_key": "charge"},
     {"event_type": "shipped", "payload": {"carrier": "post"}, "replay_key": "ship"}
   ]}'
expect_status 201
echo "HTTP $STATUS"

echo "== read the log back"
call GET "/v1/processes/$ID/events?after=0&limit=100"
printf '%s\n' "$BODY" | show

echo "== complete"
call POST "/v1/processes/$ID/complete" '{"state": "completed", "output": {"shipped": true}}'
echo "status: $(printf '%s\n' "$BODY" | field .status)"

echo "== await the terminal state"
call GET "/v1/processes/$ID/await?timeout_ms=5000"
printf '%s\n' "$BODY" | show
STATE="$(printf '%s\n' "$BODY" | field .state)"
if [[ "$STATE" != "completed" ]]; then
  echo "expected completed, got $STATE" >&2
  exit 1
fi

echo "== the log is sealed: a new append is refused, a replay is still answered"
# No -f here: this request is expected to fail (409 process_terminal).
REFUSED="$(curl -sS -o /dev/null -w '%{http_code}' ${AUTH[@]+"${AUTH[@]}"} -X POST \
  -H 'Content-Type: application/json' --data '{"event_type": "late", "payload": {}}' \
  "$URL/v1/processes/$ID/events")"
echo "new append after completion: HTTP $REFUSED"
if [[ "$REFUSED" != "409" ]]; then
  echo "expected HTTP 409" >&2
  exit 1
fi
call POST "/v1/processes/$ID/events" "$EVENT"
expect_status 200
echo "replay of 'reserve' after completion: HTTP $STATUS"
echo ok
