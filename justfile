# T-CORE: the menu. `just` lists the recipes.

default:
    @just --list

# Run every test (set TCORE_REQUIRE_SERVICES=1 to make the real-server tests mandatory).
test:
    cargo test --workspace

# Serve the engine on 127.0.0.1:8080 with a 1,000-seat demo concert and 100 users.
demo:
    cargo run --release -p tcore-engine -- serve --demo-seats 1000 --demo-users 100 --admin-token dev-admin

# Engine throughput against a bare axum handler, same driver, same run.
bench:
    cargo bench -p tcore-engine --bench http_mix

# Lints, as strict as the workspace says.
lint:
    cargo clippy --workspace --all-targets -- -D warnings
    cargo fmt --all -- --check

# What CI runs.
ci:
    bash .ci/run
