//! The simulator's integration tests: one binary, one module per area.

mod agent;
mod checker;
mod gate;
mod journey;
mod live;
mod report;
mod runs;
mod scenario;
mod store_rpc;
mod world;
