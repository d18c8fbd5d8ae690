//! Scenarios, the simulated world, the checker and the score.
