//! The agent's HTTP server (axum): `/status`, `/healthz`, `/readyz`, `/metrics`, `/loglevel`.
//!
//! - `GET /status`: `{"node","revision","enforced_revision","endpoints","errors":[…]}`.
//!   `revision` is the latest source revision received, `enforced_revision` the latest whose maps
//!   are in the kernel; callers poll until `enforced_revision` reaches what they wrote.
//! - `GET /healthz`: 200 while the sync loop runs.
//! - `GET /readyz`: 200 once a first complete sync has been enforced, 503 before.
//! - `GET /metrics`: Prometheus text format.
//! - `GET /loglevel` → the current log filter; `PUT /loglevel` with a filter (tracing
//!   EnvFilter syntax) as body changes it at run time.

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Serialize;

use crate::{
    metrics::Metrics,
    sources::{ObjectsDigest, SourceHealth},
    telemetry::LogFilter,
};

/// What `/status` reports.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Status {
    pub node: String,
    pub revision: u64,
    pub enforced_revision: u64,
    /// Local endpoints enforced (interface found, entry written, programs attached).
    pub endpoints: usize,
    /// Current problems: invalid input, compile errors, endpoints not enforced, failed writes.
    pub errors: Vec<String>,
    /// The objects behind `enforced_revision`: their count and digest
    /// (`policy_common::digest`), comparable with the API server's lists.
    pub enforced_objects: ObjectsDigest,
    /// Why the source cannot currently read the cluster (per watched kind); the last state
    /// stays enforced meanwhile.
    pub source_errors: Vec<String>,
    /// A complete sync has been enforced at least once.
    #[serde(skip)]
    pub ready: bool,
}

#[derive(Clone)]
pub struct HttpState {
    pub status: Arc<RwLock<Status>>,
    pub metrics: Arc<Metrics>,
    pub log: Option<LogFilter>,
    pub source: SourceHealth,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/loglevel", get(get_log).put(put_log))
        .with_state(state)
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the server's address (before anything else starts, so a port clash fails fast).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

fn read(state: &HttpState) -> Status {
    let mut status = state
        .status
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    status.source_errors = state.source.errors();
    status
}

async fn status(State(state): State<HttpState>) -> Json<Status> {
    Json(read(&state))
}

async fn readyz(State(state): State<HttpState>) -> Response {
    let status = read(&state);
    if !status.source_errors.is_empty() {
        let why = status.source_errors.join("; ");
        let text = if status.ready {
            format!("source unavailable, the last state stays enforced: {why}")
        } else {
            format!("no complete sync enforced yet; source unavailable: {why}")
        };
        (StatusCode::SERVICE_UNAVAILABLE, text).into_response()
    } else if status.ready {
        (StatusCode::OK, "ready").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no complete sync enforced yet",
        )
            .into_response()
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn get_log(State(state): State<HttpState>) -> Response {
    match &state.log {
        Some(log) => (StatusCode::OK, log.current()).into_response(),
        None => (StatusCode::NOT_FOUND, "no reloadable log filter").into_response(),
    }
}

async fn put_log(State(state): State<HttpState>, body: String) -> Response {
    let Some(log) = &state.log else {
        return (StatusCode::NOT_FOUND, "no reloadable log filter").into_response();
    };
    match log.set(body.trim()) {
        Ok(()) => (StatusCode::OK, log.current()).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}
