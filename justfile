# T-CORE: the menu. `just` lists the recipes.

default:
    @just --list

# The main job: a simulated ticket opening of 100,000 users for 20,000 seats.
run SCENARIO="scenarios/concert-open.toml":
    cargo run --release -p tcore-sim --bin tcore -- run {{SCENARIO}}

# A live run: goose drives engine nodes this command starts (Redis + MariaDB for the shared scenarios).
live SCENARIO="scenarios/live/concert-open.toml":
    cargo build -q --release -p tcore-engine -p tcore-sim --bins
    ./target/release/tcore load {{SCENARIO}} --spawn

# Every small scenario of scenarios/ci, each of which must pass.
ci-scenarios:
    for scenario in scenarios/ci/*.toml; do cargo run -q -p tcore-sim --bin tcore -- run --quiet "$scenario" || exit 1; done

# The CI gate: scenarios/ci judged by safety, [slo] and scenarios/baselines (JUnit and Markdown in target/tcore/gate).
gate:
    cargo run -q -p tcore-sim --bin tcore -- gate --junit target/tcore/gate/junit.xml --markdown target/tcore/gate/summary.md scenarios/ci/*.toml

# Record new baselines for scenarios/ci (commit them with the change that explains them).
gate-update:
    cargo run -q -p tcore-sim --bin tcore -- gate --update-baseline scenarios/ci/*.toml

# Run every test (set TCORE_REQUIRE_SERVICES=1 to make the real-server tests mandatory).
test:
    cargo test --workspace

# Serve the engine on 127.0.0.1:8080 with a 1,000-seat demo concert and 100 users.
demo:
    cargo run --release -p tcore-engine -- serve --demo-seats 1000 --demo-users 100 --admin-token dev-admin --session-secret "${TCORE_SESSION_SECRET:-demo-session-secret-of-at-least-32-bytes}"

# Engine throughput against a bare axum handler, same driver, same run.
bench:
    cargo bench -p tcore-engine --bench http_mix

# Hold attempts per second: memory store, then two nodes on Redis and MariaDB, and redis-benchmark's rate for the gate script.
bench-holds:
    cargo bench -p tcore-engine --bench holds

# What a hostile flood leaves in a release engine's memory, wave by wave.
bench-hostile:
    cargo bench -p tcore-engine --bench hostile_state

# The live driver's most requests per second (goose, as `tcore load` sets it up) against `wrk`, same engine, same run.
bench-live:
    cargo build -q --release -p tcore-engine --bin tcore-engine
    cargo bench -p tcore-sim --bench live_driver

# Simulated requests per wall second against a bare handler in the same world.
bench-sim:
    cargo bench -p tcore-sim --bench sim_throughput

# Live smoke: two engine nodes on redis+mariadb, a burst of holds and confirms, a database audit.
smoke:
    bash scripts/smoke-live.sh

# A real MariaDB failover: the primary SIGKILLed while fans pay, its semi-sync replica promoted; nothing acknowledged is lost (`just failover --async` loses payments).
failover *ARGS:
    bash scripts/failover-semisync.sh {{ARGS}}

# The API contract: schemathesis against live engines, every check and phase.
contract:
    bash scripts/api-contract.sh

# Apply the MariaDB schema (TCORE_DATABASE_URL, default mysql://root@127.0.0.1:3306/tcore).
migrate:
    cargo run -q -p tcore-engine -- migrate

# Lints, as strict as the workspace says.
lint:
    cargo clippy --workspace --all-targets -- -D warnings
    cargo fmt --all -- --check

# What CI runs.
ci:
    bash .ci/run
