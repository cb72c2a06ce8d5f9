//! Log output: text (colours only on a terminal) or JSON lines on stderr, through a filter that
//! the admin API can change while the broker runs (`GET`/`PUT /v1/log-level`).

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

/// The filter when neither the config nor `WEFT_LOG` sets one.
pub const DEFAULT_FILTER: &str = "info,openraft=warn,sled=warn";

/// Longest filter accepted (config, environment or admin API).
const FILTER_BYTES_MAX: usize = 4096;

struct Installed {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The directives in force, as given.
    current: Mutex<String>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Parses `tracing` filter directives (`info`, `warn,weft_broker::raft=debug`), strictly: an
/// unknown level or a malformed directive is an error naming it.
pub fn parse_filter(directives: &str) -> Result<EnvFilter, String> {
    if directives.trim().is_empty() {
        return Err("must not be empty (\"info\" is the usual level)".into());
    }
    if directives.len() > FILTER_BYTES_MAX {
        return Err(format!(
            "is {} bytes long; the most is {FILTER_BYTES_MAX}",
            directives.len()
        ));
    }
    EnvFilter::builder()
        .parse(directives)
        .map_err(|e| format!("{directives:?} is not a valid filter: {e}"))
}

/// Installs the process's logger (once; `main` calls it).
pub fn init(format: &str, directives: &str) -> Result<(), String> {
    let filter = parse_filter(directives)?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if format == "json" {
        registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .try_init()
    };
    installed.map_err(|e| format!("cannot install the logger: {e}"))?;
    INSTALLED
        .set(Installed {
            handle,
            current: Mutex::new(directives.to_string()),
        })
        .map_err(|_| "the logger was installed twice".to_string())
}

/// Why the filter could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    /// Bad directives.
    #[error("log_level {0}")]
    Invalid(String),
    /// This process did not install the broker's logger (the broker runs inside another
    /// program, such as a test).
    #[error("this process's logging is not managed by the broker")]
    NotInstalled,
}

/// The filter in force.
pub fn current() -> Result<String, LogLevelError> {
    let installed = INSTALLED.get().ok_or(LogLevelError::NotInstalled)?;
    Ok(installed
        .current
        .lock()
        .map(|c| c.clone())
        .unwrap_or_else(|p| p.into_inner().clone()))
}

/// Replaces the filter; lines already being written are unaffected.
pub fn set(directives: &str) -> Result<(), LogLevelError> {
    let filter = parse_filter(directives).map_err(LogLevelError::Invalid)?;
    let installed = INSTALLED.get().ok_or(LogLevelError::NotInstalled)?;
    let mut current = installed.current.lock().unwrap_or_else(|p| p.into_inner());
    installed
        .handle
        .reload(filter)
        .map_err(|_| LogLevelError::NotInstalled)?;
    *current = directives.to_string();
    tracing::info!(filter = directives, "log filter changed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked_strictly() {
        assert!(parse_filter("info").is_ok());
        assert!(parse_filter("warn,weft_broker::raft=debug").is_ok());
        assert!(parse_filter("").is_err());
        assert!(parse_filter("weft_broker=shouting").is_err());
        assert!(parse_filter(&"x".repeat(FILTER_BYTES_MAX + 1)).is_err());
    }
}
