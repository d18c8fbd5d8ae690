//! The log output of the `tcore` binary, set up once per process.

/// Sends `tracing` events to standard error, filtered by `RUST_LOG` (nothing but errors when
/// it is unset). With a subscriber in place, spans that no filter enables cost next to nothing;
/// without one, every span of the HTTP stack is offered to the `log` crate instead. The
/// simulator's benchmark sets up the same, so that it measures worlds as `tcore run` runs them.
pub fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
}
