//! Structured JSON logs.

use tracing_subscriber::EnvFilter;

/// JSON logs to stdout, level from `RUST_LOG` (default `info`). Call once.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_target(true)
        .with_env_filter(filter)
        .try_init();
}

/// JSON logs to any writer (the local server uses a non-blocking one).
pub fn init_with_writer<W>(writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_target(true)
        .with_env_filter(filter)
        .with_writer(writer)
        .try_init();
}
