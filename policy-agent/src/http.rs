//! The agent's HTTP servers (axum): a read-only one on TCP and a control one on a Unix socket.
//!
//! On `--http-addr` (with hostNetwork, a port on every node address, reachable by any pod that
//! can reach the node — so nothing there changes state or shows flows):
//! - `GET /status`: [`Status`] as JSON. `revision` is the latest source revision received,
//!   `enforced_revision` the latest whose maps are in the kernel; callers poll until
//!   `enforced_revision` reaches what they wrote.
//! - `GET /healthz`: 200 while the sync loop runs.
//! - `GET /readyz`: 200 once a first complete sync has been enforced, 503 before; 503 always
//!   while an installation problem ([`Status::unready`]) stands, naming it and its fix.
//! - `GET /metrics`: Prometheus text format.
//! - `GET /flows` and `GET /explain`, only with `--http-flows`: as on the control socket.
//!
//! On `--control-socket` (a Unix socket, mode 0600 in a directory of mode 0700: only root on the
//! node, or in the agent's container, can connect; `policy-agent control …` is its client):
//! - `GET /status`, as above.
//! - `GET /flows?namespace=&pod=&verdict=&since=&limit=`: the recent flows of this node
//!   ([`crate::flowstore`]), one JSON object per line, oldest first; 400 naming the field of a
//!   bad query, 404 when the agent keeps none (`--flow-records 0`); empty when the kernel's
//!   verdict events are unavailable (the agent warns at start).
//! - `GET /explain?from=&to=&port=&protocol=`: the flow judged from this node's kernel maps
//!   beside the evaluator ([`crate::live`]), as JSON; 400 names what cannot be explained.
//! - `GET /loglevel` → the current log filter; `PUT /loglevel` with a filter (tracing
//!   EnvFilter syntax) as body changes it at run time.
//!
//! On `--cni-socket` (the same permissions; a path on the node, for the chained CNI plugin):
//! see [`cni_router`].

use std::{
    fs, io,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use crate::{
    cni,
    flowstore::{self, FlowQuery, FlowStore},
    live::{ExplainQuery, LiveExplain},
    metrics::Metrics,
    sources::SourceHealth,
    telemetry::LogFilter,
};
use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};

/// What `/status` reports (the definition lab and tests share).
pub use policy_common::status::Status;

#[derive(Clone)]
pub struct HttpState {
    pub status: Arc<RwLock<Status>>,
    pub metrics: Arc<Metrics>,
    pub log: Option<LogFilter>,
    pub source: SourceHealth,
    /// The recent flows, when the agent keeps them.
    pub flows: Option<Arc<FlowStore>>,
    /// `--http-flows`: `/flows` on the TCP port too.
    pub http_flows: bool,
    /// Where `/explain` asks the sync loop (which owns the dataplane).
    pub explain: Option<tokio::sync::mpsc::Sender<ExplainRequest>>,
}

/// One `/explain` question for the sync loop, and where its answer goes.
#[derive(Debug)]
pub struct ExplainRequest {
    pub query: ExplainQuery,
    pub reply: tokio::sync::oneshot::Sender<Result<LiveExplain, String>>,
}

/// The read-only routes of the TCP port.
pub fn router(state: HttpState) -> Router {
    let router = Router::new()
        .route("/status", get(status))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let router = if state.http_flows {
        router
            .route("/flows", get(flows))
            .route("/explain", get(explain))
    } else {
        router
    };
    router.with_state(state)
}

/// The routes of the control socket.
pub fn control_router(state: HttpState) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/flows", get(flows))
        .route("/explain", get(explain))
        .route("/loglevel", get(get_log).put(put_log))
        .with_state(state)
}

/// Serves the TCP port until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves `router` on a Unix socket (the control socket, the CNI socket) until `shutdown`
/// completes, then removes the socket file.
pub async fn serve_unix(
    socket: ControlListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let served = axum::serve(socket.listener, router)
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = fs::remove_file(&socket.path);
    served
}

/// What the CNI socket's handlers share.
#[derive(Clone)]
pub struct CniState {
    pub status: Arc<RwLock<Status>>,
    /// Where ADD and DEL go: the sync loop, which owns the announcements.
    pub requests: tokio::sync::mpsc::Sender<CniMessage>,
}

/// A CNI request for the sync loop.
pub enum CniMessage {
    Attach(cni::pending::Attach),
    Detach(cni::DetachRequest),
}

/// The routes of the CNI socket (`--cni-socket`), for `policy-agent-cni` ([`crate::cni`]):
/// - `POST /cni/attach` with an [`cni::AttachRequest`]: 200 with an [`cni::AttachReply`] once
///   the pod's endpoint is enforced; 503 with the reason when the agent gives up at the request's
///   deadline; 400 for a body that does not parse.
/// - `POST /cni/detach` with a [`cni::DetachRequest`]: 200.
/// - `POST /cni/status`: 200 once a first complete sync is enforced, 503 before.
pub fn cni_router(state: CniState) -> Router {
    Router::new()
        .route(cni::ATTACH_PATH, post(cni_attach))
        .route(cni::DETACH_PATH, post(cni_detach))
        .route(cni::STATUS_PATH, post(cni_status))
        .with_state(state)
}

async fn cni_attach(State(state): State<CniState>, body: String) -> Response {
    let request: cni::AttachRequest = match serde_json::from_str(&body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("attach request: {e}")).into_response(),
    };
    let pod = format!("{}/{}", request.namespace, request.name);
    let wait = std::time::Duration::from_millis(request.timeout_ms.saturating_add(1000));
    let (reply, answer) = tokio::sync::oneshot::channel();
    let attach = cni::pending::Attach { request, reply };
    if state
        .requests
        .send(CniMessage::Attach(attach))
        .await
        .is_err()
    {
        return (StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping").into_response();
    }
    match tokio::time::timeout(wait, answer).await {
        Ok(Ok(Ok(reply))) => Json(reply).into_response(),
        Ok(Ok(Err(reason))) => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
        Ok(Err(_)) | Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "pod {pod}: the sync loop did not answer within {} ms",
                wait.as_millis()
            ),
        )
            .into_response(),
    }
}

async fn cni_detach(State(state): State<CniState>, body: String) -> Response {
    match serde_json::from_str::<cni::DetachRequest>(&body) {
        Ok(r) => {
            let _ = state.requests.send(CniMessage::Detach(r)).await;
            (StatusCode::OK, "").into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("detach request: {e}")).into_response(),
    }
}

async fn cni_status(State(state): State<CniState>) -> Response {
    let ready = state.status.read().map(|s| s.ready).unwrap_or(false);
    if ready {
        (StatusCode::OK, "ready").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "policy-agent has not enforced its first complete sync yet",
        )
            .into_response()
    }
}

/// Binds the server's address (before anything else starts, so a port clash fails fast).
///
/// The unspecified IPv6 address (`[::]`, the default) listens on both families, IPv4 arriving
/// IPv4-mapped, whatever `net.ipv6.bindv6only` says: with hostNetwork the kubelet probes the
/// agent at the node's address, which is IPv6 on an IPv6-only cluster and IPv4 otherwise. On a
/// kernel without IPv6 it falls back to `0.0.0.0` on the same port.
pub async fn bind(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let listener = match listen(addr) {
        Err(e)
            if addr.is_ipv6()
                && addr.ip().is_unspecified()
                && e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            tracing::warn!(%addr, "no IPv6 in this kernel; serving IPv4 only");
            listen(SocketAddr::from(([0, 0, 0, 0], addr.port())))?
        }
        other => other?,
    };
    tokio::net::TcpListener::from_std(listener)
}

fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The bound control socket.
pub struct ControlListener {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

/// Binds the control socket at `path`: creates its directory (mode 0700) if missing, replaces a
/// stale socket file that nothing listens on, refuses one another process serves (a second
/// agent on the same node), and leaves the socket at mode 0600.
pub fn bind_control(path: &Path) -> io::Result<ControlListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process serves this socket (a second agent on this node?)",
            ));
        }
        fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(ControlListener {
        listener,
        path: path.to_path_buf(),
    })
}

fn read(state: &HttpState) -> Status {
    let mut status = state
        .status
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    status.source_errors = state.source.errors();
    status.ready &= status.unready.is_empty();
    status
}

async fn status(State(state): State<HttpState>) -> Json<Status> {
    Json(read(&state))
}

async fn readyz(State(state): State<HttpState>) -> Response {
    let status = read(&state);
    if !status.unready.is_empty() {
        let text = format!(
            "not ready (enforcing, but installed wrongly): {}",
            status.unready.join("; ")
        );
        (StatusCode::SERVICE_UNAVAILABLE, text).into_response()
    } else if !status.source_errors.is_empty() {
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

async fn flows(
    State(state): State<HttpState>,
    query: Result<Query<FlowQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(store) = &state.flows else {
        return (
            StatusCode::NOT_FOUND,
            "this agent keeps no flows (--flow-records 0)",
        )
            .into_response();
    };
    let query = match query {
        Ok(Query(query)) => query,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("flows query: {e} (fields: namespace, pod, verdict, since, limit)"),
            )
                .into_response();
        }
    };
    match store.query(&query, flowstore::now_ms()) {
        Ok(records) => (
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            flowstore::to_lines(&records),
        )
            .into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

async fn explain(
    State(state): State<HttpState>,
    query: Result<Query<ExplainQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let query = match query {
        Ok(Query(q)) => q,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("explain query: {e} (fields: from, to, port, protocol)"),
            )
                .into_response();
        }
    };
    let Some(tx) = &state.explain else {
        return (
            StatusCode::NOT_FOUND,
            "this agent has no dataplane to explain from",
        )
            .into_response();
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if tx.send(ExplainRequest { query, reply }).await.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the sync loop is not running",
        )
            .into_response();
    }
    match answer.await {
        Ok(Ok(live)) => Json(live).into_response(),
        Ok(Err(e)) => (StatusCode::BAD_REQUEST, e).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the sync loop stopped").into_response(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(state: &HttpState, path: &str) -> (StatusCode, String) {
        let request = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let response = router(state.clone()).oneshot(request).await.unwrap();
        let code = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn an_installation_problem_keeps_readyz_failing_and_is_in_status() {
        let problem = "bpffs: mount the node's /sys/fs/bpf".to_owned();
        let state = HttpState {
            status: Arc::new(RwLock::new(Status {
                ready: true,
                errors: vec![problem.clone()],
                unready: vec![problem.clone()],
                ..Default::default()
            })),
            metrics: Arc::new(Metrics::new()),
            log: None,
            source: SourceHealth::default(),
            flows: None,
            http_flows: false,
            explain: None,
        };
        let (code, body) = get(&state, "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains(&problem), "{body}");
        let (code, body) = get(&state, "/status").await;
        assert_eq!(code, StatusCode::OK);
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status["errors"][0], problem.as_str());
        assert_eq!(
            status["ready"], false,
            "not ready on the wire either: {body}"
        );

        state.status.write().unwrap().unready.clear();
        assert_eq!(
            get(&state, "/readyz").await,
            (StatusCode::OK, "ready".into())
        );
    }

    #[tokio::test]
    async fn flows_are_served_on_the_tcp_port_only_with_http_flows() {
        let store = Arc::new(FlowStore::new("node-1", 10));
        store.push(
            flowstore::now_ms(),
            crate::flowstore::tests::flow("dropped", "x/b", "x/a"),
            None,
        );
        let mut state = HttpState {
            status: Arc::new(RwLock::new(Status::default())),
            metrics: Arc::new(Metrics::new()),
            log: None,
            source: SourceHealth::default(),
            flows: Some(store),
            http_flows: false,
            explain: None,
        };
        assert_eq!(get(&state, "/flows").await.0, StatusCode::NOT_FOUND);
        state.http_flows = true;
        let (code, body) = get(&state, "/flows?namespace=x&verdict=dropped").await;
        assert_eq!(code, StatusCode::OK);
        let records = flowstore::parse_lines(&body).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].flow.endpoint, "x/b");
        assert_eq!(get(&state, "/flows?verdict=allowed").await.1, "");
        let (code, body) = get(&state, "/flows?since=soon").await;
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(body.contains("field since"), "{body}");
        assert_eq!(
            get(&state, "/flows?limit=x").await.0,
            StatusCode::BAD_REQUEST
        );
    }
}
