#!/usr/bin/env bash
# Live smoke test: two engine nodes on redis+mariadb, a burst of concurrent holds and confirms
# at both, then an audit of the database. Exits non-zero when the audit fails.
#
# Needs Redis, MariaDB (and its `mariadb` client), curl. Settings (environment):
#   TCORE_SMOKE_MARIADB  server URL without database   (mysql://root@127.0.0.1:3306)
#   TCORE_SMOKE_REDIS    Redis URL                      (redis://127.0.0.1:6379)
#   TCORE_SMOKE_USERS    users in the burst             (300)
#   TCORE_SMOKE_SEATS    seats on sale                  (200)
#   TCORE_ENGINE_BIN     engine binary                  (built with cargo, debug profile)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

server="${TCORE_SMOKE_MARIADB:-mysql://root@127.0.0.1:3306}"
redis_url="${TCORE_SMOKE_REDIS:-redis://127.0.0.1:6379}"
users="${TCORE_SMOKE_USERS:-300}"
seats="${TCORE_SMOKE_SEATS:-200}"
run_id="$$_$(date +%s)"
database="tcore_smoke_${run_id}"
prefix="tcore_smoke_${run_id}:"
secret="smoke-secret-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"
# Fans log in with sessions signed by this secret (`tcore-engine session`), as an identity
# provider sharing it with the engine would sign them.
session_secret="smoke-session-secret-$(od -An -N16 -tx8 /dev/urandom | tr -d ' ')"
ports=(18081 18082)

host_port="${server#*://}"; host_port="${host_port##*@}"; host_port="${host_port%%/*}"
user_info=root
case "${server#*://}" in *@*) user_info="${server#*://}"; user_info="${user_info%@*}" ;; esac
mysql_args=(-h "${host_port%:*}" -P "${host_port##*:}" -u "${user_info%%:*}")
case "$user_info" in *:*) mysql_args+=("-p${user_info#*:}") ;; esac
sql() { mariadb "${mysql_args[@]}" -N -B "$database" -e "$1"; }

if [ -z "${TCORE_ENGINE_BIN:-}" ]; then
    cargo build -q -p tcore-engine --bin tcore-engine
    TCORE_ENGINE_BIN=target/debug/tcore-engine
fi

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    mariadb "${mysql_args[@]}" -e "DROP DATABASE IF EXISTS $database" || true
    redis-cli -u "$redis_url" --scan --pattern "${prefix}*" | xargs -r -n 500 redis-cli -u "$redis_url" DEL >/dev/null || true
}
trap cleanup EXIT

start_node() {
    local index="$1" demo_users="$2"
    "$TCORE_ENGINE_BIN" serve --store redis+mariadb --listen "127.0.0.1:${ports[$index]}" --node "engine-$((index + 1))" \
        --database-url "$server/$database" --redis-url "$redis_url" --redis-prefix "$prefix" --token-secret "$secret" \
        --session-secret "$session_secret" --demo-seats "$seats" --demo-users "$demo_users" --demo-points 1000 \
        "${unthrottled_fans[@]}" \
        >"target/smoke-engine-$((index + 1)).log" 2>&1 &
    pids+=($!)
    wait_ready "engine-$((index + 1))" "http://127.0.0.1:${ports[$index]}" "${pids[-1]}" "target/smoke-engine-$((index + 1)).log"
}

mkdir -p target
echo "== two nodes on redis+mariadb (database $database, key prefix $prefix)"
start_node 0 "$users"
start_node 1 0

# One user's journey: log in, join at one node, wait for admission, then try seats until one
# is held (alternating nodes) and pay for it at the other node, with an idempotency key.
journey() {
    local user="$1" base_a base_b session token reservation seat attempt
    base_a="http://127.0.0.1:${SMOKE_PORTS%% *}"; base_b="http://127.0.0.1:${SMOKE_PORTS##* }"
    if [ $((user % 2)) = 1 ]; then local swap="$base_a"; base_a="$base_b"; base_b="$swap"; fi
    session=$("$TCORE_ENGINE_BIN" session --user "$user")
    token=$(curl -sf -XPOST "$base_a/v1/schedules/1/queue" -H "authorization: Bearer $session" \
        -H "x-forwarded-for: 10.0.$((user / 250)).$((user % 250))" | sed 's/.*"token":"\([^"]*\)".*/\1/')
    curl -sf "$base_b/v1/queue/$token?wait_s=10" -H "authorization: Bearer $session" >/dev/null
    for attempt in 0 1 2 3 4 5 6 7; do
        seat=$(( (user * 7 + attempt * 13) % SMOKE_SEATS + 1 ))
        reservation=$(curl -s -XPOST "$base_a/v1/holds" -H "authorization: Bearer $session" -H "x-queue-token: $token" \
            -H 'content-type: application/json' -H "idempotency-key: hold-$user-$attempt" \
            -d "{\"schedule_id\":1,\"seat_id\":$seat}" | sed -n 's/.*"reservation_id":\([0-9]*\).*/\1/p')
        if [ -n "$reservation" ]; then
            curl -s -XPOST "$base_b/v1/reservations/$reservation/confirm" -H "authorization: Bearer $session" \
                -H "x-queue-token: $token" -H "idempotency-key: pay-$user" -o /dev/null -w '%{http_code}\n'
            return 0
        fi
        local swap="$base_a"; base_a="$base_b"; base_b="$swap"
    done
    echo none
}
export -f journey
export SMOKE_PORTS="${ports[*]}" SMOKE_SEATS="$seats" TCORE_ENGINE_BIN TCORE_SESSION_SECRET="$session_secret"

echo "== burst: $users users, holds and confirms at both nodes"
outcomes=$(seq 1 "$users" | xargs -P 64 -I{} bash -c 'journey {}' | sort | uniq -c)
echo "$outcomes"

# Let the outbox relays catch up.
for _ in $(seq 1 50); do
    [ "$(sql "SELECT COUNT(*) FROM outbox WHERE sent = FALSE")" = 0 ] && break
    sleep 0.2
done

echo "== audit"
failed=0
confirmed=$(sql "SELECT COUNT(*) FROM reservations WHERE status = 'CONFIRMED'")
echo "confirmed reservations: $confirmed"
[ "$confirmed" -gt 0 ] || { echo "FAIL  nothing was confirmed"; failed=1; }
audit_records
check "confirmations by both nodes' holds" \
    "$(sql "SELECT COUNT(DISTINCT f.node) FROM accepted_fences f JOIN reservations r ON r.id = f.reservation_id WHERE r.status = 'CONFIRMED'")" 2
check "outbox events not yet relayed to the stream" "$(sql "SELECT COUNT(*) FROM outbox WHERE sent = FALSE")" 0
if [ "$failed" = 0 ]; then echo "smoke: PASS"; else echo "smoke: FAIL"; fi
exit "$failed"
