//! Structured JSON logs.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// `RUST_LOG` as `level` or `level,target=level,...` (no regular expressions);
/// `info` when unset or unreadable.
fn filter() -> Targets {
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| "info".parse().expect("a valid filter"))
}

/// JSON logs to stdout, level from `RUST_LOG` (default `info`). Call once.
pub fn init() {
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_target(true)
        .with_max_level(tracing::Level::TRACE)
        .finish()
        .with(filter())
        .try_init();
}

/// JSON logs to any writer (the local server uses a non-blocking one).
pub fn init_with_writer<W>(writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_target(true)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(writer)
        .finish()
        .with(filter())
        .try_init();
}
