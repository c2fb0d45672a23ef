//! The Kubernetes source: one kube-rs watcher per watched kind, with the default backoff and
//! managed fields stripped, turned into store [`Update`]s.
//!
//! - Nothing is sent until every kind has completed its initial list: the first update holds
//!   the whole cluster, so the agent never compiles a partial view (pods without their policies
//!   would be open).
//! - A re-list (after 410 Gone, or any watch restart) is buffered and replaces its kind
//!   atomically when complete (`InitDone`).
//! - While the API server is unreachable the watchers back off and retry; the store keeps the
//!   last known state, so enforcement stays as it was.
//! - The revision is the number of changes applied (each Apply, Delete and completed list).

use std::{fmt::Debug, path::Path, pin::Pin, time::SystemTime};

use futures::{FutureExt, Stream, StreamExt, stream::select_all};
use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
};
use kube::{
    Api, Client, Resource, ResourceExt,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Change, Kind, Object, SourceHealth, Update, strip};
use crate::model::ObjectKey;

/// Every (API group, resource) the agent lists and watches, cluster-wide. The deployment's RBAC
/// must grant `list` and `watch` on exactly these (a test checks it).
pub const WATCHED: &[(&str, &str)] = &[
    ("", "pods"),
    ("", "namespaces"),
    ("", "services"),
    ("", "nodes"),
    ("networking.k8s.io", "networkpolicies"),
    ("discovery.k8s.io", "endpointslices"),
];

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("inferring the Kubernetes client configuration (in-cluster or $KUBECONFIG): {source}")]
    Infer {
        #[source]
        source: kube::config::InferConfigError,
    },
    #[error("building the Kubernetes client: {source}")]
    Client {
        #[source]
        source: kube::Error,
    },
}

/// A client from `kubeconfig`, or from the in-cluster service account / `$KUBECONFIG`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubernetesError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| KubernetesError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        None => kube::Config::infer()
            .await
            .map_err(|source| KubernetesError::Infer { source })?,
    };
    Client::try_from(config).map_err(|source| KubernetesError::Client { source })
}

/// What one watched kind yields into the merged stream.
enum KindEvent {
    Change(Change),
    /// The kind's (re-)list completed: replace it with the store's content.
    Listed(Change),
    Error(Kind, String),
    /// `Init` / `InitApply`: buffered by the store, nothing to do yet.
    Nothing,
}

type KindStream = Pin<Box<dyn Stream<Item = KindEvent> + Send>>;

/// One watcher for kind `K`. A (re-)list is buffered here, in the projection the store keeps,
/// and replaces its kind when complete; no other copy of the objects is kept (a kube reflector
/// store would hold every full object a second time).
fn reflect<K>(api: Api<K>, kind: Kind, wrap: fn(K) -> Object) -> KindStream
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut listing: Vec<Object> = Vec::new();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|o: &mut K| strip(o.meta_mut()))
        .map(move |event| match event {
            Ok(watcher::Event::Apply(o)) => KindEvent::Change(Change::Apply(wrap(o))),
            Ok(watcher::Event::Delete(o)) => {
                let key = ObjectKey::new(
                    if kind.namespaced() {
                        o.namespace().unwrap_or_default()
                    } else {
                        String::new()
                    },
                    o.name_any(),
                );
                KindEvent::Change(Change::Delete(kind, key))
            }
            Ok(watcher::Event::Init) => {
                listing.clear();
                KindEvent::Nothing
            }
            Ok(watcher::Event::InitApply(o)) => {
                listing.push(wrap(o));
                KindEvent::Nothing
            }
            Ok(watcher::Event::InitDone) => {
                KindEvent::Listed(Change::Replace(kind, std::mem::take(&mut listing)))
            }
            // The watched resourceVersion expired: routine; the watcher re-lists.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                debug!(kind = kind.as_str(), "watch expired (410 Gone); re-listing");
                KindEvent::Nothing
            }
            Err(e) => KindEvent::Error(kind, e.to_string()),
        });
    Box::pin(stream)
}

fn namespaced<K>(client: &Client) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
{
    Api::all(client.clone())
}

/// Watches every kind in [`WATCHED`] and sends updates to `tx` until it is dropped; reports
/// failing watches to `health` as they happen.
pub async fn run(client: Client, tx: mpsc::Sender<Update>, health: SourceHealth) {
    let streams: Vec<KindStream> = vec![
        reflect(namespaced::<Pod>(&client), Kind::Pod, Object::from),
        reflect(
            Api::<Namespace>::all(client.clone()),
            Kind::Namespace,
            Object::from,
        ),
        reflect(namespaced::<Service>(&client), Kind::Service, Object::from),
        reflect(Api::<Node>::all(client.clone()), Kind::Node, Object::from),
        reflect(
            namespaced::<NetworkPolicy>(&client),
            Kind::NetworkPolicy,
            Object::from,
        ),
        reflect(
            namespaced::<EndpointSlice>(&client),
            Kind::EndpointSlice,
            Object::from,
        ),
    ];
    let probe = move |kind: Kind| readable(client.clone(), kind);
    run_streams(select_all(streams), tx, health, probe).await
}

/// How often a kind whose watch failed is checked for being readable again.
const RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether one object of `kind` can be listed now: a failed watch that the watcher later
/// resumes emits nothing until the next change, so recovery is confirmed this way.
fn readable(client: Client, kind: Kind) -> futures::future::BoxFuture<'static, bool> {
    async fn list<K>(client: Client) -> bool
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    {
        let params = kube::api::ListParams::default().limit(1);
        Api::<K>::all(client).list_metadata(&params).await.is_ok()
    }
    match kind {
        Kind::Pod => list::<Pod>(client).boxed(),
        Kind::Namespace => list::<Namespace>(client).boxed(),
        Kind::Service => list::<Service>(client).boxed(),
        Kind::Node => list::<Node>(client).boxed(),
        Kind::NetworkPolicy => list::<NetworkPolicy>(client).boxed(),
        Kind::EndpointSlice => list::<EndpointSlice>(client).boxed(),
    }
}

/// The batching state machine behind [`run`], separate from the watchers so it can be driven by
/// any stream of kind events.
async fn run_streams(
    mut events: impl Stream<Item = KindEvent> + Unpin,
    tx: mpsc::Sender<Update>,
    health: SourceHealth,
    probe: impl Fn(Kind) -> futures::future::BoxFuture<'static, bool>,
) {
    let mut listed = std::collections::BTreeSet::new();
    let mut pending: Vec<Change> = Vec::new();
    let mut errors: std::collections::BTreeMap<Kind, String> = Default::default();
    let mut revision: u64 = 0;
    let mut errors_dirty = false;
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let first = tokio::select! {
            event = events.next() => match event {
                Some(e) => e,
                None => return,
            },
            _ = recheck.tick(), if !errors.is_empty() => {
                let failing: Vec<Kind> = errors.keys().copied().collect();
                for kind in failing {
                    if tokio::time::timeout(RECHECK * 2, probe(kind)).await.unwrap_or(false) {
                        info!(kind = kind.as_str(), "readable again");
                        errors.remove(&kind);
                        errors_dirty = true;
                    }
                }
                if !errors_dirty {
                    continue;
                }
                KindEvent::Nothing
            }
        };
        let changed_at = SystemTime::now();
        let mut next = Some(first);
        // Take everything already available as one batch.
        while let Some(event) = next.take() {
            match event {
                KindEvent::Change(change) => {
                    errors_dirty |= errors.remove(&change_kind(&change)).is_some();
                    revision += 1;
                    pending.push(change);
                }
                KindEvent::Listed(change) => {
                    let kind = change_kind(&change);
                    health.listed();
                    errors_dirty |= errors.remove(&kind).is_some();
                    if listed.insert(kind) {
                        info!(kind = kind.as_str(), "initial list complete");
                    }
                    revision += 1;
                    pending.push(change);
                }
                KindEvent::Error(kind, message) => {
                    warn!(kind = kind.as_str(), error = %message, "watch failed; keeping the last known state");
                    errors.insert(kind, format!("watching {}: {message}", kind.as_str()));
                    errors_dirty = true;
                }
                KindEvent::Nothing => {}
            }
            next = events.next().now_or_never().flatten();
        }
        if errors_dirty {
            health.set(errors.values().cloned().collect());
        }
        if listed.len() < Kind::ALL.len() || (pending.is_empty() && !errors_dirty) {
            continue;
        }
        errors_dirty = false;
        let update = Update {
            changes: std::mem::take(&mut pending),
            revision,
            changed_at,
            errors: errors.values().cloned().collect(),
            origins: Default::default(),
        };
        if tx.send(update).await.is_err() {
            return;
        }
    }
}

fn change_kind(change: &Change) -> Kind {
    match change {
        Change::Apply(o) => o.kind(),
        Change::Delete(kind, _) | Change::Replace(kind, _) => *kind,
    }
}
