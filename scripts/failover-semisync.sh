#!/usr/bin/env bash
# Durability of acknowledged payments across a real MariaDB failover. An engine node on
# Redis and a MariaDB primary (scripts/mariadb-semisync.sh: its own two servers, replicated
# semi-synchronously with AFTER_SYNC) takes fans' holds and confirms over HTTP; the replica's
# link to the primary drops (its IO thread stopped, as a lagging replica's would be) and,
# while fans still pay, the primary is killed with SIGKILL. The replica is promoted, and the
# engine restarted on it (the engine reads its database URL once, at start). Then every
# confirmation the engine acknowledged (2xx) must be on the promoted replica: CONFIRMED, for
# its fan, charged exactly once in the ledger, and read back CONFIRMED through the engine.
# Exits non-zero when one is lost.
#
#   failover-semisync.sh           semi-synchronous replication: nothing acknowledged is lost
#   failover-semisync.sh --async   asynchronous replication, the known-unsafe configuration:
#                                  the same run loses the payments acknowledged after the
#                                  link dropped, and fails
#
# Needs mariadbd and mariadb-install-db (10.3 or later), Redis, curl. Settings (environment):
#   TCORE_FAILOVER_REDIS      Redis URL                                  (redis://127.0.0.1:6379)
#   TCORE_FAILOVER_USERS      fans, each paying for one seat             (800)
#   TCORE_FAILOVER_FANS       fans paying at once                        (16)
#   TCORE_FAILOVER_PAY_S      seconds of payments before the link drops  (4; sooner once a
#                                                                         quarter are done)
#   TCORE_FAILOVER_LAG_S      seconds from the link drop to the crash    (2; 0: no link drop)
#   TCORE_FAILOVER_PORT       the engine's port                          (18095)
#   TCORE_SEMISYNC_PORTS      the primary's and the replica's ports      ("3307 3308")
#   TCORE_ENGINE_BIN          engine binary                              (built with cargo, debug profile)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

mode=semisync
case "${1:-}" in
    --async) mode=async ;;
    "") ;;
    *)
        echo "usage: $0 [--async]" >&2
        exit 2
        ;;
esac
redis_url="${TCORE_FAILOVER_REDIS:-redis://127.0.0.1:6379}"
users="${TCORE_FAILOVER_USERS:-800}"
fans="${TCORE_FAILOVER_FANS:-16}"
pay_s="${TCORE_FAILOVER_PAY_S:-4}"
lag_s="${TCORE_FAILOVER_LAG_S:-2}"
port="${TCORE_FAILOVER_PORT:-18095}"
read -r primary_port replica_port <<<"${TCORE_SEMISYNC_PORTS:-3307 3308}"
export TCORE_SEMISYNC_PORTS="$primary_port $replica_port"
run_id="$$_$(date +%s)"
prefix="tcore_failover_${run_id}:"
secret() { printf '%s-%s' "$1" "$(od -An -N16 -tx8 /dev/urandom | tr -d ' ')"; }
token_secret=$(secret failover-token-secret)
session_secret=$(secret failover-session-secret)
# Fans log in with sessions signed by this secret (`tcore-engine session`).
export TCORE_SESSION_SECRET="$session_secret"
base="http://127.0.0.1:$port"
out="target/tcore/failover/$mode"
started=$SECONDS

if [ -z "${TCORE_ENGINE_BIN:-}" ]; then
    cargo build -q --locked -p tcore-engine --bin tcore-engine
    TCORE_ENGINE_BIN=target/debug/tcore-engine
fi

servers=""
engine_pid=""
fan_pids=()
cleanup() {
    for pid in "${fan_pids[@]}" $engine_pid; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "$servers" ]; then
        bash scripts/mariadb-semisync.sh stop "$servers" 2>/dev/null || true
        for name in primary replica; do cp "$servers/$name/error.log" "$out/mariadb-$name.log" 2>/dev/null || true; done
        rm -rf "$servers"
    fi
    redis-cli -u "$redis_url" --scan --pattern "${prefix}*" | xargs -r -n 500 redis-cli -u "$redis_url" DEL >/dev/null || true
}
trap cleanup EXIT
servers="$(mktemp -d -t tcore-failover.XXXXXX)"

replica_sql() { mariadb --no-defaults -h 127.0.0.1 -P "$replica_port" -uroot -N -B tcore -e "$1"; }
primary_status() {
    mariadb --no-defaults -h 127.0.0.1 -P "$primary_port" -uroot -N -B -e "SHOW GLOBAL STATUS LIKE '$1'" | cut -f2
}

# One engine node on `server` (a MariaDB URL without database); its log is `log`.
start_engine() {
    local server="$1" log="$2" demo_users="$3"
    "$TCORE_ENGINE_BIN" serve --store redis+mariadb --listen "127.0.0.1:$port" --node engine-1 \
        --database-url "$server/tcore" --redis-url "$redis_url" --redis-prefix "$prefix" --token-secret "$token_secret" \
        --session-secret "$session_secret" --demo-seats "$users" --demo-users "$demo_users" --demo-points 1000 \
        "${unthrottled_fans[@]}" >"$log" 2>&1 &
    engine_pid=$!
    # Opening the demo accounts, one replicated commit each, comes before the first answer.
    wait_until engine "$engine_pid" "$log" 60 curl -sf "$base/readyz"
}
stop_engine() {
    kill "$engine_pid" 2>/dev/null || true
    wait "$engine_pid" 2>/dev/null || true
    engine_pid=""
}

# One fan: log in, join, wait for admission, hold seat `user`, pay for it with an idempotency
# key. Prints `confirm USER RESERVATION STATUS ENDED_US TOKEN` or `no-hold USER STEP STATUS
# ENDED_US` (status 000: no answer; ENDED_US: when the last answer, or its failure, came).
fan() {
    local user="$1" session body token reservation status
    local curl_args=(-s --max-time 10 -w ' %{http_code}')
    session=$("$TCORE_ENGINE_BIN" session --user "$user")
    body=$(curl "${curl_args[@]}" -XPOST "$base/v1/schedules/1/queue" -H "authorization: Bearer $session" || true)
    [[ $body =~ \"token\":\"([^\"]+)\" ]] || { echo "no-hold $user join ${body##* } ${EPOCHREALTIME/./}"; return 0; }
    token=${BASH_REMATCH[1]}
    body=$(curl "${curl_args[@]}" "$base/v1/queue/$token?wait_s=5" -H "authorization: Bearer $session" || true)
    [[ $body == *'"ADMITTED"'* ]] || { echo "no-hold $user admission ${body##* } ${EPOCHREALTIME/./}"; return 0; }
    body=$(curl "${curl_args[@]}" -XPOST "$base/v1/holds" -H "authorization: Bearer $session" \
        -H "x-queue-token: $token" -H 'content-type: application/json' -H "idempotency-key: hold-$user" \
        -d "{\"schedule_id\":1,\"seat_id\":$user}" || true)
    [[ $body =~ \"reservation_id\":([0-9]+) ]] || { echo "no-hold $user hold ${body##* } ${EPOCHREALTIME/./}"; return 0; }
    reservation=${BASH_REMATCH[1]}
    status=$(curl "${curl_args[@]}" -o /dev/null -XPOST "$base/v1/reservations/$reservation/confirm" \
        -H "authorization: Bearer $session" -H "x-queue-token: $token" -H "idempotency-key: pay-$user" || true)
    echo "confirm $user $reservation ${status# } ${EPOCHREALTIME/./} $token"
}

# Fan number `index` of the crowd pays for seats index, index + fans, ... until told to stop.
fan_loop() {
    local user="$1"
    while [ "$user" -le "$users" ] && [ ! -e "$out/stop" ]; do
        fan "$user"
        user=$((user + fans))
    done >"$out/fan-$1.txt"
}

fault="link drop"
[ "$lag_s" = 0 ] && fault=crash
phase() { echo "== [$((SECONDS - started)) s] $*"; }

rm -rf "$out"
mkdir -p "$out"
phase "MariaDB primary and replica, replication $mode (in $servers)"
start_args=()
[ "$mode" = async ] && start_args=(--async)
bash scripts/mariadb-semisync.sh start "$servers" "${start_args[@]}"
phase "engine on the primary (key prefix $prefix)"
start_engine "mysql://root@127.0.0.1:$primary_port" "$out/engine-primary.log" "$users"

phase "$fans fans at a time pay for seats (of $users)"
for index in $(seq 1 "$fans"); do
    fan_loop "$index" &
    fan_pids+=($!)
done
# Until a quarter of the fans are done, or for TCORE_FAILOVER_PAY_S at most: on a fast machine
# the rest still pay when the faults come.
pay_until_us=$((${EPOCHREALTIME/./} + pay_s * 1000000))
while [ "${EPOCHREALTIME/./}" -lt "$pay_until_us" ] && [ "$(cat "$out"/fan-*.txt 2>/dev/null | wc -l)" -lt $((users / 4)) ]; do
    sleep 0.2
done
# When the first fault hits: the link drop or, without one, the crash.
if [ "$lag_s" != 0 ]; then
    phase "the replica's link drops (its IO thread stopped); fans keep paying for ${lag_s}s"
    bash scripts/mariadb-semisync.sh disconnect "$servers"
    fault_us=${EPOCHREALTIME/./}
    sleep "$lag_s"
fi
semisync_state="$(primary_status Rpl_semi_sync_master_status)"
semisync_no_tx="$(primary_status Rpl_semi_sync_master_no_tx)"
echo "primary: Rpl_semi_sync_master_status $semisync_state, Rpl_semi_sync_master_yes_tx" \
    "$(primary_status Rpl_semi_sync_master_yes_tx), Rpl_semi_sync_master_no_tx $semisync_no_tx"
phase "SIGKILL the primary"
[ "$lag_s" = 0 ] && fault_us=${EPOCHREALTIME/./}
bash scripts/mariadb-semisync.sh crash-primary "$servers"
sleep 1
touch "$out/stop"
wait "${fan_pids[@]}"
fan_pids=()
stop_engine

phase "failover: promote the replica, restart the engine on it"
bash scripts/mariadb-semisync.sh promote "$servers"
start_engine "mysql://root@127.0.0.1:$replica_port" "$out/engine-replica.log" 0

# Every confirm, by what the engine answered: acknowledged (2xx), refused (4xx: definitely not
# confirmed), unknown (5xx or no answer: either way).
cat "$out"/fan-*.txt >"$out/outcomes.txt"
rm "$out"/fan-*.txt "$out/stop"
awk '$1 == "confirm" {
        kind = $4 ~ /^2/ ? "acknowledged" : ($4 ~ /^4/ ? "refused" : "unknown")
        print kind, $2, $3, $5, $6
    }' "$out/outcomes.txt" >"$out/confirms.txt"
count() { awk -v kind="$1" '$1 == kind' "$out/confirms.txt" | wc -l; }
acknowledged=$(count acknowledged)
refused=$(count refused)
unknown=$(count unknown)
journeys_after_fault=$(awk -v since="$fault_us" '$5 >= since' "$out/outcomes.txt" | wc -l)
acknowledged_after_fault=$(awk -v since="$fault_us" '$1 == "acknowledged" && $4 >= since' "$out/confirms.txt" | wc -l)
no_hold=$(awk '$1 == "no-hold" { print $3, $4 }' "$out/outcomes.txt" | sort | uniq -c \
    | awk '{ n += $1; by = by (by ? ", " : "") $2 " " $3 ": " $1 } END { printf "%d%s", n, by ? " (" by ")" : "" }')

# Each confirm is present when its reservation is CONFIRMED for its fan and charged once.
values=$(awk '{ printf "%s(\x27%s\x27, %s, %s)", (NR > 1 ? ", " : ""), $1, $2, $3 }' "$out/confirms.txt")
replica_sql "CREATE TEMPORARY TABLE confirms (kind VARCHAR(12), user_id BIGINT UNSIGNED, reservation_id BIGINT UNSIGNED);
    INSERT INTO confirms VALUES ${values:-('none', 0, 0)};
    SELECT c.kind, c.reservation_id,
        EXISTS (SELECT 1 FROM reservations r WHERE r.id = c.reservation_id AND r.user_id = c.user_id AND r.status = 'CONFIRMED')
        AND (SELECT COUNT(*) FROM ledger l WHERE l.reservation_id = c.reservation_id AND l.reason = 'charge') = 1
    FROM confirms c" >"$out/present.txt"
present=$(awk '$1 == "acknowledged" && $3 == 1' "$out/present.txt" | wc -l)
lost=$((acknowledged - present))
unknown_present=$(awk '$1 == "unknown" && $3 == 1' "$out/present.txt" | wc -l)

# The same payments through the repointed engine, as their fans would read them.
read_back() {
    local user="$1" reservation="$2" token="$3" session
    session=$("$TCORE_ENGINE_BIN" session --user "$user")
    curl -s --max-time 10 "$base/v1/reservations/$reservation" -H "authorization: Bearer $session" -H "x-queue-token: $token" \
        | grep -q '"status":"CONFIRMED"' && echo "$reservation"
    return 0
}
export -f read_back
export base TCORE_ENGINE_BIN
read_back_confirmed=$(awk '$1 == "acknowledged" { print $2, $3, $5 }' "$out/confirms.txt" \
    | xargs -r -P 8 -n 3 bash -c 'read_back "$@"' _ | wc -l)

echo "== payments (replication $mode)"
echo "fans without a hold: $no_hold"
echo "fans whose journey ended after the $fault: $journeys_after_fault"
echo "confirms sent: $((acknowledged + refused + unknown))"
echo "acknowledged: $acknowledged ($acknowledged_after_fault after the $fault)"
echo "refused:      $refused"
echo "unknown:      $unknown (in flight at the crash or timed out; $unknown_present of them confirmed on the replica)"
echo "present:      $present (CONFIRMED on the promoted replica, charged once)"
echo "lost:         $lost"

echo "== audit of the promoted replica"
failed=0
sql() { replica_sql "$1"; }
check "acknowledged confirms lost" "$lost" 0
check "acknowledged confirms read back CONFIRMED through the engine" "$read_back_confirmed" "$acknowledged"
audit_records
[ "$acknowledged" -gt 0 ] || { echo "FAIL  nothing was acknowledged"; failed=1; }
[ "$journeys_after_fault" -gt 0 ] || { echo "FAIL  no fan was paying at the $fault (raise TCORE_FAILOVER_USERS)"; failed=1; }
if [ "$mode" = semisync ]; then
    check "the primary's semi-sync at the crash" "$semisync_state" ON
    check "commits the primary answered without a replica's acknowledgement" "$semisync_no_tx" 0
fi
if [ "$lost" -gt 0 ]; then
    echo "lost reservations (first 10): $(awk '$1 == "acknowledged" && $3 != 1 { print $2 }' "$out/present.txt" | head -10 | tr '\n' ' ')"
fi
echo "took $((SECONDS - started)) s; logs in $out"
if [ "$failed" = 0 ]; then echo "failover ($mode): PASS"; else echo "failover ($mode): FAIL"; fi
exit "$failed"
