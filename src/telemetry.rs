//! Logging setup. Structured (JSON) logs for production, text for a terminal.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` filter.
pub fn init(format: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    let res = if format == "json" {
        registry
            .with(fmt::layer().json().flatten_event(true))
            .try_init()
    } else {
        registry.with(fmt::layer()).try_init()
    };
    // A second init (tests) keeps the first subscriber.
    let _ = res;
}
