//! The engine's integration tests: one binary, one module per area.

mod agent;
mod api;
mod concurrency;
mod connections;
mod contract;
mod edges;
mod hold_modes;
mod idempotency_lease;
mod services;
mod shared_stores;
mod store_faults;
mod support;
mod trust;
