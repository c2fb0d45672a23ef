//! Structured logs (tracing): text or JSON, with a filter that can be changed at run time
//! (`PUT /loglevel` on the HTTP server).

use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

use crate::cli::LogFormat;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("log filter {filter:?}: {source}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("installing the log subscriber: {source}")]
    Init {
        #[source]
        source: tracing_subscriber::util::TryInitError,
    },
    #[error("reloading the log filter: {source}")]
    Reload {
        #[source]
        source: reload::Error,
    },
}

/// Changes the log filter of the installed subscriber.
#[derive(Clone)]
pub struct LogFilter {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogFilter {
    pub fn set(&self, filter: &str) -> Result<(), TelemetryError> {
        let new = parse(filter)?;
        self.handle
            .reload(new)
            .map_err(|source| TelemetryError::Reload { source })
    }

    pub fn current(&self) -> String {
        self.handle
            .with_current(|f| f.to_string())
            .unwrap_or_default()
    }
}

fn parse(filter: &str) -> Result<EnvFilter, TelemetryError> {
    EnvFilter::try_new(filter).map_err(|source| TelemetryError::Filter {
        filter: filter.to_owned(),
        source,
    })
}

/// Installs the global subscriber.
pub fn init(format: LogFormat, filter: &str) -> Result<LogFilter, TelemetryError> {
    let (filter, handle) = reload::Layer::new(parse(filter)?);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true))
            .try_init(),
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer()).try_init(),
    };
    result.map_err(|source| TelemetryError::Init { source })?;
    Ok(LogFilter { handle })
}

/// An error and its causes on one line, each written once: a cause whose text the message
/// already holds (the agent's errors write their source into their message) is not repeated.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let line = c.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_is_written_once() {
        let bind = crate::agent::AgentError::Bind {
            addr: "127.0.0.1:9965".parse().unwrap(),
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "address in use"),
        };
        let error = anyhow::Error::from(bind);
        let text = error_chain(error.as_ref());
        assert_eq!(
            text,
            "binding the HTTP server to 127.0.0.1:9965: address in use"
        );
        // A cause the message does not hold is still written.
        let wrapped =
            anyhow::Error::new(std::io::Error::other("disk full")).context("writing the pins");
        assert_eq!(error_chain(wrapped.as_ref()), "writing the pins: disk full");
    }
}
