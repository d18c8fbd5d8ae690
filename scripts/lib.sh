# Shared by the scripts that start live engine nodes and servers; source it.

# Engine options for a burst of fans from one address: admitted as fast as they join, never rate
# limited, with as many accounts per address as they need.
unthrottled_fans=(--accounts-per-ip-per-hour 100000 --admission-rate-per-s 100000 --active-max 1000000
    --rate-limit-per-ip 100000 --rate-limit-per-token 1000 --rate-limit-burst 100000)

# Runs `command...` every 0.2 s until it succeeds, for up to `seconds`; fails, pointing at the
# log, if the process `pid` stops first or the command never succeeds.
wait_until() {
    local name="$1" pid="$2" log="$3" seconds="$4"
    shift 4
    for _ in $(seq 1 $((seconds * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    echo "$name did not become ready; see $log" >&2
    return 1
}

# Waits for the node `name` (process `pid`, log `log`) to answer `url`/readyz, for up to 20 s.
wait_ready() {
    local name="$1" url="$2" pid="$3" log="$4"
    wait_until "$name" "$pid" "$log" 20 curl -sf "$url/readyz"
}

# Prints one audited figure and whether it is the one wanted; sets `failed=1` when it is not.
check() {
    local what="$1" got="$2" want="$3"
    if [ "$got" = "$want" ]; then echo "ok    $what: $got"; else echo "FAIL  $what: $got (want $want)"; failed=1; fi
}

# The invariants of a system of record that no fault may break, through the caller's `sql`
# (a query on its database, printing the value).
audit_records() {
    check "seats confirmed more than once" \
        "$(sql "SELECT COUNT(*) FROM (SELECT seat_id FROM reservations WHERE status = 'CONFIRMED' GROUP BY seat_id HAVING COUNT(*) > 1) twice")" 0
    check "accounts whose ledger does not sum to the balance" \
        "$(sql "SELECT COUNT(*) FROM accounts a LEFT JOIN (SELECT user_id, SUM(delta) AS total FROM ledger GROUP BY user_id) l ON l.user_id = a.id WHERE a.balance <> COALESCE(l.total, 0)")" 0
    check "confirmations without their outbox event" \
        "$(sql "SELECT COUNT(*) FROM reservations r WHERE r.status = 'CONFIRMED' AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.reservation_id = r.id AND o.kind = 'reservation_confirmed')")" 0
    check "confirmations not charged exactly once" \
        "$(sql "SELECT COUNT(*) FROM reservations r WHERE r.status = 'CONFIRMED' AND (SELECT COUNT(*) FROM ledger l WHERE l.reservation_id = r.id AND l.reason = 'charge') <> 1")" 0
}
