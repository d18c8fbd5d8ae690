//! T-CORE's ticketing engine: a waiting room, seat holds with fencing tokens, point
//! payments, idempotent retries and an outbox, behind an HTTP API.
//!
//! The layers, from the inside out: [`domain`] (pure rules), [`store`] (the traits and the
//! embedded store), [`engine`] (use cases, guards, background work), [`api`] (HTTP).

#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod catalogue;
pub mod clock;
pub mod config;
pub mod domain;
pub mod engine;
pub mod faults;
pub mod guards;
mod known_users;
mod recent_tokens;
pub mod server;
pub mod sessions;
pub mod store;
pub mod telemetry;
pub mod tokens;
mod waiters;

pub use api::app;
pub use engine::{Engine, EngineError, EngineParts};
