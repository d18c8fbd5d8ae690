//! The engine's integration tests: one binary, one module per area.

mod agent;
mod api;
mod concurrency;
mod hold_modes;
mod support;
