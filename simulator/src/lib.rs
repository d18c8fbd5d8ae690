//! Scenarios, the simulated world, the checker and the score.
//!
//! **Invariant:** nothing in this crate reads the wall clock or unseeded randomness in
//! scenario, history or checker logic: times are simulated microseconds carried in the data.

pub mod allocator;
pub mod checker;
pub mod gate;
pub mod history;
pub mod journey;
pub mod live;
pub mod logs;
mod reply;
pub mod scenario;
pub mod score;
pub mod world;
