#!/usr/bin/env bash
# The API contract: schemathesis (from PyPI, in a virtual environment under target/) fuzzes the
# engine's own OpenAPI document against live engines, with every check and every phase
# (examples, coverage, fuzzing, and the stateful phase that follows the document's links):
#   1. the public API (/v1/), as a fan with a session and an admitted queue token;
#   2. the admin API (/admin/v1/), on an engine of its own, with a named admin token.
# Prints each run's generated cases and failures; exits non-zero on any failure.
#
# Settings (environment):
#   TCORE_ENGINE_BIN           engine binary                       (built with cargo, debug profile)
#   TCORE_CONTRACT_EXAMPLES    most cases per operation and phase   (100)
#   TCORE_CONTRACT_SEED        the fuzzer's seed                    (random, printed)
#   TCORE_SCHEMATHESIS         schemathesis version                 (the one pinned below)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

version="${TCORE_SCHEMATHESIS:-4.32.5}"
examples="${TCORE_CONTRACT_EXAMPLES:-100}"
seed="${TCORE_CONTRACT_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
out=target/tcore/contract
venv=target/schemathesis-venv
secret() { printf '%s-%s' "$1" "$(od -An -N16 -tx8 /dev/urandom | tr -d ' ')"; }
token_secret=$(secret contract-token-secret)
session_secret=$(secret contract-session-secret)
webhook_secret=$(secret contract-webhook-secret)
admin_secret=$(secret contract-admin-token)
ports=(18091 18092)

if [ -z "${TCORE_ENGINE_BIN:-}" ]; then
    cargo build -q --locked -p tcore-engine --bin tcore-engine
    TCORE_ENGINE_BIN=target/debug/tcore-engine
fi
if ! "$venv/bin/st" --version 2>/dev/null | grep -qF "$version"; then
    echo "== installing schemathesis $version in $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$version"
fi

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
mkdir -p "$out"

# An engine on the memory store with the demo schedule, limits high enough that the fuzzer
# meets the handlers rather than the rate limits, and the extra flags given.
start_engine() {
    local name="$1" port="$2"; shift 2
    "$TCORE_ENGINE_BIN" serve --store memory --listen "127.0.0.1:$port" --node "$name" \
        --token-secret "$token_secret" --session-secret "$session_secret" \
        --demo-seats 500 --demo-users 50 --demo-points 1000 \
        --admission-rate-per-s 1000 --rate-limit-per-ip 100000 --rate-limit-per-token 100000 \
        --rate-limit-burst 100000 --accounts-per-ip-per-hour 100000 "$@" >"$out/$name.log" 2>&1 &
    pids+=($!)
    wait_ready "$name" "http://127.0.0.1:$port" "${pids[-1]}" "$out/$name.log"
}

# One schemathesis run; its summary and JUnit report go to $out/<name>.
fuzz() {
    local name="$1" port="$2"; shift 2
    echo "== schemathesis: $name (seed $seed, at most $examples cases per operation and phase)"
    local status=0
    SCHEMATHESIS_HOOKS=schemathesis_hooks PYTHONPATH=scripts \
        "$venv/bin/st" --config-file scripts/schemathesis.toml run "http://127.0.0.1:$port/openapi.json" \
        --checks all --seed "$seed" --max-examples "$examples" --workers 1 --no-color \
        --report junit --report-junit-path "$out/$name.junit.xml" "$@" | tee "$out/$name.txt" || status=$?
    local cases failures
    cases=$(grep -oE '[0-9]+ generated' "$out/$name.txt" | tail -1 | cut -d' ' -f1)
    failures=$(grep -oE '[0-9]+ unique failures?' "$out/$name.txt" | tail -1 | cut -d' ' -f1)
    echo "contract $name: ${cases:-?} cases generated, ${failures:-0} failures (exit status $status); summary in $out/$name.txt"
    return "$status"
}

start_engine contract-public "${ports[0]}" --dev-sessions --payment-webhook-secret "$webhook_secret"
start_engine contract-admin "${ports[1]}" --admin-token "contract=$admin_secret" --admin-auth-failures-max 10000

# A fan of the demo: a session, a place in the line, and the admission that lets it book.
public="http://127.0.0.1:${ports[0]}"
session=$("$TCORE_ENGINE_BIN" session --user 1 --session-secret "$session_secret")
token=$(curl -sf -XPOST "$public/v1/schedules/1/queue" -H "authorization: Bearer $session" | sed 's/.*"token":"\([^"]*\)".*/\1/')
status=$(curl -sf "$public/v1/queue/$token?wait_s=10" -H "authorization: Bearer $session" | sed 's/.*"status":"\([^"]*\)".*/\1/')
[ "$status" = ADMITTED ] || { echo "the contract's fan was not admitted ($status)" >&2; exit 1; }

# The credentials go to schemathesis by security scheme (scripts/schemathesis.toml).
export TCORE_CONTRACT_SESSION="$session" TCORE_CONTRACT_QUEUE_TOKEN="$token" TCORE_CONTRACT_ADMIN_TOKEN="$admin_secret"
# The payment provider's secret, for scripts/schemathesis_hooks.py to sign the webhook with.
export TCORE_CONTRACT_WEBHOOK_SECRET="$webhook_secret"
failed=0
fuzz public "${ports[0]}" --include-path-regex '^/v1/' || failed=1
fuzz admin "${ports[1]}" --include-path-regex '^/admin/' || failed=1
if [ "$failed" = 0 ]; then echo "contract: PASS"; else echo "contract: FAIL"; fi
exit "$failed"
