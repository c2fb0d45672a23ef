//! The daemon: source → store → (debounce) → compile → discover → write → status, plus the HTTP
//! server and the flow log.
//!
//! - A sync runs when the source sends an update, when interfaces or routes change (netlink
//!   notifications: a pod's veth appearing gets attached at once), and every second while the
//!   last sync was incomplete (an endpoint without interface, a failed write).
//! - Updates are debounced: a sync waits until the input has been quiet for `--debounce-ms`
//!   (at most ten times that in total).
//! - Nothing is compiled before the source delivered its first complete state; until then (and
//!   whenever the source is unreachable later) the pinned maps a previous agent left stay
//!   enforced as they are.
//! - SIGTERM / SIGINT stop the agent leaving programs, links and maps pinned (enforcement stays);
//!   with `--cleanup-on-exit` everything is detached and unpinned instead.
//! - Installation problems found before the agent started ([`Startup::unready`]) are logged at
//!   error level and stay in `/status` errors; the agent enforces but `/readyz` stays 503. A
//!   missing uplink is warned once per change (`crate::checks`), mark-mask conflicts with the
//!   node's netfilter rules every time a new one appears (`crate::marks`).
//! - With `--cni-socket`, a pod's CNI ADD ([`crate::cni`]) wakes the loop at once (no debounce):
//!   the pod's announced addresses stand in for `status.podIPs`, and the ADD is answered after
//!   the sync that enforced the endpoint, or at its deadline with the reason. With
//!   `--cni-conf-dir`, a task keeps the plugin chained in the node's CNI configuration.

use std::{
    collections::BTreeSet,
    io,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::{
    audit,
    checks::{self, UplinkChange},
    cli::Args,
    cni::pending::Announcements,
    compiler::NodeContext,
    dataplane::{Dataplane, DataplaneError},
    endpoints::{Discovery, HostView, netlink::Netlink},
    flowlog::{self, AuditState, FlowContext, LogOptions},
    flowstore::FlowStore,
    http::{self, HttpState, Status},
    marks,
    metrics::{self, Metrics, endpoint_state},
    node::NodeSettings,
    sources::{ClusterStore, SourceHealth, Update, kubernetes, manifest},
    sync::{Report, Syncer},
    telemetry::LogFilter,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("binding the HTTP server to {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("binding the control socket {path}: {source}")]
    ControlSocket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("binding the CNI socket {path}: {source}")]
    CniSocket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening the dataplane pinned under {dir}: {source}")]
    Dataplane {
        dir: PathBuf,
        #[source]
        source: DataplaneError,
    },
    #[error("netlink in the agent's network namespace: {source}")]
    Netlink {
        #[source]
        source: io::Error,
    },
    #[error("Kubernetes source: {source}")]
    Kubernetes {
        #[source]
        source: kubernetes::KubernetesError,
    },
    #[error("removing the dataplane (--cleanup-on-exit): {source}")]
    Cleanup {
        #[source]
        source: DataplaneError,
    },
}

/// What `main` found out before the agent started (while it was still single-threaded).
#[derive(Clone, Debug, Default)]
pub struct Startup {
    /// Installation problems, each naming its fix: logged at error level, listed first in
    /// `/status` errors, and `/readyz` answers 503 with them for as long as the agent runs.
    pub unready: Vec<String>,
}

/// Runs the agent until SIGTERM / SIGINT.
pub async fn run(args: Args, log: Option<LogFilter>, startup: Startup) -> Result<(), AgentError> {
    let metrics = Arc::new(Metrics::new());
    for problem in &startup.unready {
        error!(problem = %problem, "installation problem: enforcing, but never ready");
    }
    let status = Arc::new(RwLock::new(Status {
        node: args.node_name.clone(),
        errors: startup.unready.clone(),
        unready: startup.unready.clone(),
        ..Default::default()
    }));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(signals(stop_tx));

    let listener = http::bind(args.http_addr)
        .await
        .map_err(|source| AgentError::Bind {
            addr: args.http_addr,
            source,
        })?;
    let control =
        http::bind_control(&args.control_socket).map_err(|source| AgentError::ControlSocket {
            path: args.control_socket.clone(),
            source,
        })?;
    let source_health =
        SourceHealth::new(metrics.source_errors.clone(), metrics.source_lists.clone());
    let (explain_tx, explain_rx) = mpsc::channel::<http::ExplainRequest>(8);
    let store = (args.flow_records > 0)
        .then(|| Arc::new(FlowStore::new(&args.node_name, args.flow_records)));
    let http_state = HttpState {
        status: status.clone(),
        metrics: metrics.clone(),
        log,
        source: source_health.clone(),
        flows: store.clone(),
        http_flows: args.http_flows,
        explain: Some(explain_tx),
    };
    let mut control_stop = stop_rx.clone();
    let control_task = tokio::spawn(http::serve_unix(
        control,
        http::control_router(http_state.clone()),
        async move {
            let _ = control_stop.wait_for(|s| *s).await;
        },
    ));
    let mut http_stop = stop_rx.clone();
    let http_task = tokio::spawn(http::serve(listener, http_state, async move {
        let _ = http_stop.wait_for(|s| *s).await;
    }));

    let cni_requests = match &args.cni_socket {
        Some(path) => {
            let socket = http::bind_control(path).map_err(|source| AgentError::CniSocket {
                path: path.clone(),
                source,
            })?;
            let (tx, rx) = mpsc::channel::<http::CniMessage>(64);
            let state = http::CniState {
                status: status.clone(),
                requests: tx,
            };
            let mut cni_stop = stop_rx.clone();
            tokio::spawn(http::serve_unix(
                socket,
                http::cni_router(state),
                async move {
                    let _ = cni_stop.wait_for(|s| *s).await;
                },
            ));
            info!(socket = %path.display(), "serving the chained CNI plugin");
            if let Some(conf_dir) = &args.cni_conf_dir {
                let install = crate::cni::chain::Install {
                    conf_dir: conf_dir.clone(),
                    bin_dir: args.cni_bin_dir.clone(),
                    socket: path.clone(),
                    timeout_seconds: args.cni_timeout_seconds,
                };
                tokio::spawn(keep_chained(install, metrics.clone()));
            }
            Some(rx)
        }
        None => None,
    };

    tokio::spawn(marks::watch(args.mark_mask, metrics.clone()));
    checks::raise_memlock();

    let log = LogOptions {
        flows: args.flow_log,
        allowed: args.flow_log_allowed,
        records: args.flow_records > 0,
    };
    let config = event_config(
        policy_common::Config::with_mark_mask(args.mark_mask),
        log,
        false,
    );
    let mut dataplane =
        Dataplane::open(&args.bpffs_dir, config).map_err(|source| AgentError::Dataplane {
            dir: args.bpffs_dir.clone(),
            source,
        })?;
    info!(dir = %args.bpffs_dir.display(), mode = ?dataplane.attach_mode(), "dataplane open");
    // The reader runs without --flow-log too: the flow store and audit mode need the events
    // (without either, the kernel sends none until a sync turns them on, see `event_config`).
    let flows = Arc::new(RwLock::new(FlowContext::default()));
    let flows = match dataplane.events() {
        Ok(reader) => {
            tokio::spawn(flowlog::run(
                reader,
                flows.clone(),
                metrics.clone(),
                log,
                store,
            ));
            Some(flows)
        }
        Err(e) => {
            warn!(error = %e, "flow log, flow records and audit mode unavailable");
            None
        }
    };

    let (updates_tx, updates) = mpsc::channel::<Update>(64);
    match &args.manifest_dir {
        Some(dir) => {
            info!(dir = %dir.display(), "source: manifest directory");
            tokio::spawn(manifest::run(
                dir.clone(),
                Duration::from_millis(args.manifest_poll_ms.max(1)),
                updates_tx,
            ));
        }
        None => {
            let client = kubernetes::client(args.kubeconfig.as_deref())
                .await
                .map_err(|source| AgentError::Kubernetes { source })?;
            info!("source: Kubernetes API");
            tokio::spawn(kubernetes::run(client, updates_tx, source_health));
        }
    }
    let interfaces = watch_interfaces().map_err(|source| AgentError::Netlink { source })?;
    let netlink = Netlink::new().map_err(|source| AgentError::Netlink { source })?;
    let discovery = Discovery::new().map_err(|source| AgentError::Netlink { source })?;

    let mut lp = Loop {
        settings: NodeSettings {
            name: args.node_name.clone(),
            ips: args.node_ips.clone(),
            uplinks: args.uplinks.clone(),
        },
        debounce: Duration::from_millis(args.debounce_ms),
        syncer: Syncer::new(dataplane),
        store: ClusterStore::default(),
        have_state: false,
        pending: Vec::new(),
        netlink,
        discovery,
        metrics: metrics.clone(),
        status,
        flows,
        log,
        last_problems: BTreeSet::new(),
        unready: startup.unready,
        uplinks_attached: None,
        started: SystemTime::now(),
        announcements: Announcements::default(),
        last_errors: Vec::new(),
    };
    lp.run(updates, interfaces, explain_rx, cni_requests, stop_rx)
        .await;

    let _ = http_task.await;
    let _ = control_task.await;
    if args.cleanup_on_exit {
        // Unchained first: once the agent is gone no pod could start on this node otherwise.
        if let Some(conf_dir) = &args.cni_conf_dir {
            let removed = crate::cni::run(&crate::cni::CniArgs {
                command: crate::cni::CniCommand::Uninstall {
                    cni_conf_dir: conf_dir.clone(),
                    cni_bin_dir: args.cni_bin_dir.clone(),
                },
            });
            match removed {
                Ok(text) => info!(done = %text, "CNI plugin removed (--cleanup-on-exit)"),
                Err(e) => {
                    error!(error = %crate::telemetry::error_chain(&e), "removing the CNI plugin failed: remove policy-agent-cni from the node's CNI configuration by hand")
                }
            }
        }
        info!("removing programs, links and maps (--cleanup-on-exit)");
        lp.syncer
            .into_enforcer()
            .remove_pins()
            .map_err(|source| AgentError::Cleanup { source })?;
    } else {
        info!("stopping; programs and maps stay pinned and enforcing");
    }
    Ok(())
}

async fn signals(stop: watch::Sender<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    let _ = stop.send(true);
}

/// Link, address and route changes of this namespace, coalesced into a channel of capacity 1.
fn watch_interfaces() -> io::Result<mpsc::Receiver<()>> {
    let socket = Netlink::subscribe()?;
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("netlink-watch".into())
        .spawn(move || {
            let mut buf = Vec::with_capacity(1 << 16);
            loop {
                buf.clear();
                if let Err(e) = socket.recv(&mut buf, 0) {
                    // ENOBUFS: notifications were lost; a resync covers them.
                    if e.raw_os_error() != Some(libc::ENOBUFS) {
                        warn!(error = %e, "netlink notifications stopped");
                        return;
                    }
                }
                if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                    return;
                }
            }
        })?;
    Ok(rx)
}

/// Keeps `policy-agent-cni` installed and chained (see [`crate::cni::chain`]).
async fn keep_chained(install: crate::cni::chain::Install, metrics: Arc<Metrics>) {
    use crate::cni::chain;
    if let Some(bin_dir) = install.bin_dir.clone() {
        let dir = bin_dir.clone();
        let copied = tokio::task::spawn_blocking(move || {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            chain::install_binary(&exe, &bin_dir).map_err(|e| crate::telemetry::error_chain(&e))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match copied {
            Ok(copied) => info!(dir = %dir.display(), copied, "CNI plugin binary in place"),
            Err(e) => error!(error = %e, "installing the CNI plugin binary failed"),
        }
    }
    let mut first = true;
    let mut last_error = None;
    loop {
        let inst = install.clone();
        let outcome = tokio::task::spawn_blocking(move || chain::ensure(&inst)).await;
        match outcome {
            Ok(Ok(done)) => {
                metrics.cni_chained.set(1);
                if done.repaired && first {
                    info!(file = %done.file.display(), "CNI plugin chained");
                } else if done.repaired {
                    metrics.cni_chain_repairs.inc();
                    warn!(file = %done.file.display(), "CNI configuration rewritten without the plugin; chained again");
                }
                last_error = None;
            }
            Ok(Err(e)) => {
                metrics.cni_chained.set(0);
                let text = crate::telemetry::error_chain(&e);
                if last_error.as_ref() != Some(&text) {
                    error!(error = %text, "new pods may start before their endpoint is enforced: the CNI plugin is not chained");
                }
                last_error = Some(text);
            }
            Err(e) => error!(error = %e, "CNI chain check failed"),
        }
        first = false;
        tokio::time::sleep(crate::cni::chain::RECHECK).await;
    }
}

enum Wake {
    Update(Update),
    Explain(http::ExplainRequest),
    Cni(http::CniMessage),
    CniDeadline,
    Interfaces,
    Retry,
    Tick,
    MapTick,
    Stop,
}

struct Loop {
    settings: NodeSettings,
    debounce: Duration,
    syncer: Syncer<Dataplane>,
    store: ClusterStore,
    have_state: bool,
    /// When the changes not yet enforced were made.
    pending: Vec<SystemTime>,
    netlink: Netlink,
    discovery: Discovery,
    metrics: Arc<Metrics>,
    status: Arc<RwLock<Status>>,
    flows: Option<Arc<RwLock<FlowContext>>>,
    log: LogOptions,
    last_problems: BTreeSet<String>,
    /// [`Startup::unready`]: always first in `/status` errors.
    unready: Vec<String>,
    /// Devices that got `to_network` in the last sync (`None` before the first).
    uplinks_attached: Option<usize>,
    started: SystemTime,
    /// Pods announced by the chained CNI plugin, and their waiting ADDs.
    announcements: Announcements,
    /// Every problem the last sync reported (what a refused ADD quotes).
    last_errors: Vec<String>,
}

const RETRY: Duration = Duration::from_secs(1);
const METRICS_INTERVAL: Duration = Duration::from_secs(1);
/// How often map entries are counted between syncs (a walk of every map, CONNTRACK included).
const MAP_USAGE_INTERVAL: Duration = Duration::from_secs(5);

impl Loop {
    async fn run(
        &mut self,
        mut updates: mpsc::Receiver<Update>,
        mut interfaces: mpsc::Receiver<()>,
        mut explains: mpsc::Receiver<http::ExplainRequest>,
        mut cni: Option<mpsc::Receiver<http::CniMessage>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(METRICS_INTERVAL);
        let mut maps_tick = tokio::time::interval(MAP_USAGE_INTERVAL);
        let mut source_open = true;
        loop {
            let wake = tokio::select! {
                u = updates.recv(), if source_open => match u {
                    Some(u) => Wake::Update(u),
                    None => { source_open = false; warn!("source stopped; keeping the last state"); continue }
                },
                Some(()) = interfaces.recv() => Wake::Interfaces,
                Some(req) = explains.recv() => Wake::Explain(req),
                Some(m) = recv_some(&mut cni) => Wake::Cni(m),
                _ = sleep_until(self.cni_deadline()) => Wake::CniDeadline,
                _ = sleep_until(retry_at), if retry_at.is_some() => Wake::Retry,
                _ = tick.tick() => Wake::Tick,
                _ = maps_tick.tick() => Wake::MapTick,
                _ = stop.wait_for(|s| *s) => Wake::Stop,
            };
            match wake {
                Wake::Stop => return,
                Wake::Tick => {
                    self.collect_counters();
                    continue;
                }
                Wake::MapTick => {
                    tokio::task::block_in_place(|| self.record_maps());
                    continue;
                }
                Wake::Explain(req) => {
                    let answer = tokio::task::block_in_place(|| self.explain(&req.query));
                    let _ = req.reply.send(answer);
                    continue;
                }
                Wake::CniDeadline => {
                    self.announcements.answer(
                        self.syncer.programmed(),
                        &self.last_errors,
                        Instant::now(),
                    );
                    continue;
                }
                Wake::Cni(http::CniMessage::Detach(d)) => self.announcements.detach(&d),
                Wake::Cni(http::CniMessage::Attach(a)) => {
                    self.metrics.cni_attaches.inc();
                    self.announcements.announce(a, Instant::now());
                    // A pod waits for this sync: no debounce.
                    if self.have_state {
                        let complete = tokio::task::block_in_place(|| self.sync());
                        retry_at = (!complete).then(|| tokio::time::Instant::now() + RETRY);
                    }
                    continue;
                }
                Wake::Update(u) => self.take(u),
                Wake::Interfaces | Wake::Retry => {}
            }
            if !self.have_state {
                continue;
            }
            // Debounce: wait for quiet, bounded.
            let started = Instant::now();
            let bound = self.debounce * 10;
            let mut stopping = false;
            loop {
                let wait = self.debounce.min(bound.saturating_sub(started.elapsed()));
                if wait.is_zero() {
                    break;
                }
                let more = tokio::select! {
                    u = updates.recv(), if source_open => u.map(Wake::Update),
                    Some(()) = interfaces.recv() => Some(Wake::Interfaces),
                    _ = stop.wait_for(|s| *s) => Some(Wake::Stop),
                    _ = tokio::time::sleep(wait) => None,
                };
                match more {
                    None => break,
                    Some(Wake::Update(u)) => self.take(u),
                    Some(Wake::Stop) => {
                        stopping = true;
                        break;
                    }
                    Some(_) => {}
                }
            }
            let complete = tokio::task::block_in_place(|| self.sync());
            retry_at = (!complete).then(|| tokio::time::Instant::now() + RETRY);
            if stopping {
                return;
            }
        }
    }

    fn take(&mut self, update: Update) {
        self.pending.push(update.changed_at);
        self.store.apply(update);
        self.have_state = true;
        self.metrics.revision.set(self.store.revision as i64);
        self.status_mut().revision = self.store.revision;
    }

    /// `/explain`: the flow judged from the kernel maps read back now, per direction this node
    /// decides, beside the evaluator on the enforced view of the state (audited policies left
    /// out, as the compiler leaves them out).
    fn explain(&self, q: &crate::live::ExplainQuery) -> Result<crate::live::LiveExplain, String> {
        use crate::evaluator::{self, Evaluator, Peer, Protocol};
        use crate::live::{self, KernelEndpoint, LiveDirection};
        use crate::netpol::flows;
        use policy_common::{Direction, Reason};
        let cluster = audit::enforced_view(&self.store.cluster);
        let protocol = Protocol::parse_defaulted(q.protocol.as_deref())
            .ok_or_else(|| format!("protocol {:?}: expected TCP, UDP or SCTP", q.protocol))?;
        let from = flows::parse_target(&cluster, &q.from).map_err(|e| format!("from: {e}"))?;
        let to = flows::parse_target(&cluster, &q.to).map_err(|e| format!("to: {e}"))?;
        let family = flows::family(&cluster, &from, &to);
        let src = flows::peer(&cluster, &from, family).map_err(|e| format!("from: {e}"))?;
        let dst = flows::peer(&cluster, &to, family).map_err(|e| format!("to: {e}"))?;
        let (Some(src_ip), Some(dst_ip)) = (src.ip(), dst.ip()) else {
            return Err("both ends need an address".into());
        };
        let flow = evaluator::Flow {
            src: src.clone(),
            dst: dst.clone(),
            protocol,
            port: q.port,
        };
        let view = self
            .syncer
            .enforcer()
            .kernel_view()
            .map_err(|e| format!("reading the kernel maps: {e}"))?;
        let rules = self
            .syncer
            .applied()
            .map(|m| m.rules.clone())
            .unwrap_or_default();
        let ev = Evaluator::new(&cluster);
        let mut directions = Vec::new();
        for (direction, local, peer_ip) in [
            (Direction::Egress, &src, dst_ip),
            (Direction::Ingress, &dst, src_ip),
        ] {
            let pod: &crate::model::ObjectKey = match local {
                Peer::Pod { pod, .. } => pod,
                _ => continue,
            };
            let Some(programmed) = self.syncer.programmed().get(pod) else {
                continue;
            };
            let kernel_ep = view.endpoints.get(&programmed.ifindex);
            let ids = view.identities(peer_ip);
            let kernel = match kernel_ep {
                Some(ep) if flow.has_v4_mapped_address() => {
                    live::decision(live::judge_v4_mapped(ep, direction), 0, &rules)
                }
                Some(_) if src_ip == dst_ip => live::self_traffic(),
                Some(ep) => {
                    let (reason, rule) = view.judge(ep, direction, ids, protocol.number(), q.port);
                    live::decision(reason, rule, &rules)
                }
                None => live::decision(Reason::DroppedEndpointNotProgrammed, 0, &rules),
            };
            let verdict = ev.evaluate_direction(&flow, direction);
            let evaluator = live::evaluator_decision(&verdict);
            directions.push(LiveDirection {
                direction: match direction {
                    Direction::Ingress => "ingress".into(),
                    Direction::Egress => "egress".into(),
                },
                endpoint: pod.to_string(),
                ifindex: programmed.ifindex,
                kernel_endpoint: kernel_ep.map(|ep| KernelEndpoint {
                    id: ep.id,
                    identity: ep.identity,
                    flags: live::flag_names(ep.flags),
                }),
                peer: peer_ip,
                peer_identity: ids.identity,
                peer_cidr_identity: ids.cidr_identity,
                agrees: kernel.allowed == evaluator.allowed,
                kernel,
                evaluator,
            });
        }
        Ok(crate::live::LiveExplain {
            node: self.settings.name.clone(),
            directions,
        })
    }

    fn status_mut(&self) -> std::sync::RwLockWriteGuard<'_, Status> {
        self.status.write().unwrap_or_else(|e| e.into_inner())
    }

    /// One complete pass; true when everything desired is enforced.
    fn sync(&mut self) -> bool {
        let started = Instant::now();
        let revision = self.store.revision;
        let objects = self.store.digest();
        let view = match HostView::read(&mut self.netlink) {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "reading interfaces failed");
                self.metrics
                    .sync_errors
                    .get_or_create(&metrics::StageLabel {
                        stage: metrics::stage::DISCOVERY,
                    })
                    .inc();
                return false;
            }
        };
        let node = NodeContext {
            node_name: self.settings.name.clone(),
            node_ips: self.settings.node_ips(&view),
        };
        // Audited policies are not enforced: the kernel gets the cluster without them.
        let audited = audit::audited(&self.store.cluster);
        let enforced = audit::enforced_view(&self.store.cluster);
        let enforced = self
            .announcements
            .overlay(enforced, &self.settings.name, Instant::now());
        let compilation = self.syncer.compile(&enforced, &node);
        drop(enforced);
        let local = Syncer::<Dataplane>::local_pods(&compilation);
        let found = self.discovery.find(&view, &local);
        let present = view
            .links
            .iter()
            .map(|l| (l.index, l.name.clone()))
            .collect();
        let uplinks = self.settings.uplinks(&view, found.values());
        let report = self.syncer.write(&compilation, &found, &present, &uplinks);
        self.record_uplinks(&uplinks, report.uplinks_attached);
        let elapsed = started.elapsed();
        self.metrics.sync_duration.observe(elapsed.as_secs_f64());
        self.metrics.syncs.inc();
        self.metrics
            .compile_errors
            .set(compilation.errors.len() as i64);
        self.record_endpoints(&report);
        self.record_maps();

        let audit_errors = audit::annotation_errors(&self.store.cluster);
        self.metrics
            .input_errors
            .set((self.store.errors.len() + audit_errors.len()) as i64);
        let mut errors: Vec<String> = self.store.errors.clone();
        errors.extend(audit_errors);
        errors.extend(compilation.errors.iter().map(|e| self.store.describe(e)));
        errors.extend(report.problems.iter().cloned());
        self.log_problems(&errors);
        self.answer_cni(errors.clone());
        // Before the status says enforced: events of flows opened after that are judged.
        self.set_audit(audited);
        {
            let mut status = self.status_mut();
            status.revision = revision;
            status.endpoints = report.endpoints_enforced as u64;
            status.errors = self.unready.iter().cloned().chain(errors).collect();
            if report.complete {
                status.enforced_revision = revision;
                status.enforced_objects = objects;
                status.ready = true;
            }
        }
        if report.complete {
            self.metrics.enforced_revision.set(revision as i64);
            let now = SystemTime::now();
            // Changes made before the agent started measure downtime, not enforcement latency.
            for changed in self.pending.drain(..).filter(|c| *c >= self.started) {
                let latency = now.duration_since(changed).unwrap_or_default();
                self.metrics
                    .enforcement_latency
                    .observe(latency.as_secs_f64());
            }
        }
        tracing::debug!(
            revision,
            complete = report.complete,
            ms = elapsed.as_secs_f64() * 1e3,
            endpoints = report.endpoints_enforced,
            "sync"
        );
        report.complete
    }

    /// Answers the ADDs this sync satisfied (or whose deadline passed), quoting `errors`.
    fn answer_cni(&mut self, errors: Vec<String>) {
        self.last_errors = errors;
        if self.announcements.is_empty() {
            return;
        }
        let answered =
            self.announcements
                .answer(self.syncer.programmed(), &self.last_errors, Instant::now());
        for waited in answered.enforced {
            self.metrics
                .cni_attach_duration
                .observe(waited.as_secs_f64());
        }
        self.metrics.cni_refusals.inc_by(answered.refused as u64);
    }

    /// When the next waiting ADD runs out of time.
    fn cni_deadline(&self) -> Option<tokio::time::Instant> {
        self.announcements
            .next_deadline()
            .map(tokio::time::Instant::from_std)
    }

    fn record_endpoints(&self, report: &Report) {
        for (state, n) in [
            (
                endpoint_state::ENFORCED,
                report.endpoints_enforced - report.endpoints_not_programmed,
            ),
            (
                endpoint_state::NOT_PROGRAMMED,
                report.endpoints_not_programmed,
            ),
            (endpoint_state::NO_INTERFACE, report.endpoints_no_interface),
            (endpoint_state::FAILED, report.endpoints_failed),
        ] {
            self.metrics
                .endpoints
                .get_or_create(&metrics::StateLabel { state })
                .set(n as i64);
        }
        let stage = |stage| metrics::StageLabel { stage };
        if report.maps_failed {
            self.metrics
                .sync_errors
                .get_or_create(&stage(metrics::stage::MAPS))
                .inc();
        }
        if report.endpoints_failed > 0 {
            self.metrics
                .sync_errors
                .get_or_create(&stage(metrics::stage::ENDPOINTS))
                .inc();
        }
        if report.uplinks_failed > 0 {
            self.metrics
                .sync_errors
                .get_or_create(&stage(metrics::stage::UPLINKS))
                .inc();
        }
    }

    /// The uplink gauge, and a warning when no device carries `to_network` (once per change).
    fn record_uplinks(&mut self, candidates: &[String], attached: usize) {
        self.metrics.uplinks_attached.set(attached as i64);
        match checks::uplink_change(self.uplinks_attached, attached) {
            Some(UplinkChange::Missing) => warn!(
                candidates = ?candidates,
                "no uplink or tunnel device carries to_network: Service traffic of egress-isolated \
                 pods to backends on other nodes leaves unchecked; name the devices with --uplink"
            ),
            Some(UplinkChange::Restored) => info!(attached, "uplinks carry to_network again"),
            None => {}
        }
        self.uplinks_attached = Some(attached);
    }

    /// Map entries and pressure, counted in the kernel maps themselves (after every sync and
    /// every [`MAP_USAGE_INTERVAL`], so that CONNTRACK, which the programs fill, stays current).
    fn record_maps(&self) {
        match self.syncer.enforcer().map_usage() {
            Ok(usage) => {
                for u in usage {
                    self.metrics.set_map_entries(u.map, u.entries, u.capacity);
                }
            }
            Err(e) => warn!(error = %e, "counting map entries failed"),
        }
    }

    fn collect_counters(&self) {
        match self.syncer.enforcer().counters() {
            Ok(counts) => self.metrics.set_packet_counts(&counts),
            Err(e) => warn!(error = %e, "reading packet counters failed"),
        }
    }

    /// Logs problems when they appear (not on every retry).
    fn log_problems(&mut self, errors: &[String]) {
        let now: BTreeSet<String> = errors.iter().cloned().collect();
        for e in now.difference(&self.last_problems) {
            warn!(problem = %e, "not enforced as written");
        }
        for e in self.last_problems.difference(&now) {
            info!(problem = %e, "resolved");
        }
        self.last_problems = now;
    }

    /// Turns the kernel's allowed-flow events on while a policy is in audit (off again after),
    /// and hands the flow log what it needs to name flows and judge them.
    fn set_audit(&mut self, audited: BTreeSet<crate::model::ObjectKey>) {
        let active = !audited.is_empty() && self.flows.is_some();
        let current = self.syncer.enforcer().config();
        let wanted = event_config(current, self.log, active);
        if wanted != current {
            match self.syncer.enforcer_mut().set_config(wanted) {
                Ok(()) => info!(
                    audit = active,
                    allowed_events = wanted.events_allowed != 0,
                    "verdict events reconfigured"
                ),
                Err(e) => warn!(
                    error = %e,
                    audit = active,
                    "writing CONFIG failed; the kernel keeps its previous event settings, so audit \
                     may see no flows (or only drops, with --flow-log)"
                ),
            }
        }
        let state = active.then(|| Arc::new(AuditState::new(&self.store.cluster, audited)));
        self.refresh_flows(state);
    }

    fn refresh_flows(&self, audit: Option<Arc<AuditState>>) {
        let Some(flows) = &self.flows else { return };
        if !self.log.flows && !self.log.records && audit.is_none() {
            // Nothing reads the events: keep the context small.
            let mut ctx = flows.write().unwrap_or_else(|e| e.into_inner());
            if ctx.audit.is_some() {
                *ctx = FlowContext::default();
            }
            return;
        }
        let ctx = FlowContext {
            audit,
            rules: self
                .syncer
                .applied()
                .map(|m| m.rules.clone())
                .unwrap_or_default(),
            endpoints: self
                .syncer
                .programmed()
                .iter()
                .map(|(pod, p)| (p.info.id, pod.clone()))
                .collect(),
            services: self.store.service_backends(),
            pods_by_ip: crate::model::pods_by_address(&self.store.cluster)
                .into_iter()
                .map(|(ip, key)| (ip, key.clone()))
                .collect(),
        };
        *flows.write().unwrap_or_else(|e| e.into_inner()) = ctx;
    }
}

/// The event switches of CONFIG: drops with `--flow-log`, allowed new flows with
/// `--flow-log-allowed`, and both (at the default rate limit, or the one `base` has) while flows
/// are recorded (`--flow-records`, on by default) or a policy is in audit. Everything else of
/// `base` is kept.
pub fn event_config(
    base: policy_common::Config,
    log: LogOptions,
    audit: bool,
) -> policy_common::Config {
    let mut config = base;
    let rate = match base.events_per_sec {
        0 => policy_common::Config::DEFAULT.events_per_sec,
        n => n,
    };
    config.events_per_sec = if log.flows || log.records || audit {
        rate
    } else {
        0
    };
    config.events_allowed = u32::from((log.flows && log.allowed) || log.records || audit);
    config
}

/// The next message of an optional channel; never, without one.
async fn recv_some<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_common::Config;

    #[test]
    fn audit_turns_allowed_events_on_without_the_flow_log() {
        let base = Config::with_mark_mask(0x00ff_0000);
        let opts = |flows, allowed| LogOptions {
            flows,
            allowed,
            records: false,
        };
        let events = |c: Config| (c.events_per_sec, c.events_allowed);
        let recording = LogOptions {
            records: true,
            ..opts(false, false)
        };
        assert_eq!(events(event_config(base, recording, false)), (1000, 1));
        assert_eq!(
            events(event_config(base, opts(false, false), false)),
            (0, 0)
        );
        assert_eq!(events(event_config(base, opts(false, true), false)), (0, 0));
        assert_eq!(
            events(event_config(base, opts(true, false), false)),
            (1000, 0)
        );
        assert_eq!(
            events(event_config(base, opts(true, true), false)),
            (1000, 1)
        );
        assert_eq!(
            events(event_config(base, opts(false, false), true)),
            (1000, 1)
        );
        assert_eq!(
            events(event_config(base, opts(true, false), true)),
            (1000, 1)
        );
        // Off again when the last audited policy goes; the rest of CONFIG is untouched.
        let on = event_config(base, opts(false, false), true);
        let off = event_config(on, opts(false, false), false);
        assert_eq!(events(off), (0, 0));
        assert_eq!(off.mark_mask, 0x00ff_0000);
        assert_eq!(off.ct_tcp_timeout_s, base.ct_tcp_timeout_s);
        // A rate set elsewhere is kept.
        let mut custom = base;
        custom.events_per_sec = 50;
        assert_eq!(
            events(event_config(custom, opts(false, false), true)),
            (50, 1)
        );
    }
}
