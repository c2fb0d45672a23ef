//! Where the cluster state comes from: the Kubernetes API ([`kubernetes`]) or a directory of YAML
//! manifests ([`manifest`]).
//!
//! Both sources speak the same language: batches of [`Change`]s tagged with a revision
//! ([`Update`]), applied by one [`ClusterStore`] to one [`Cluster`]. Everything after the store —
//! compiler, diff, map writes — is the same code for both, so what the lab proves with manifests is
//! what a cluster runs.

pub mod documents;
pub mod kubernetes;
pub mod manifest;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::SystemTime,
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::compiler::CompileError;
use crate::model::{Cluster, ObjectKey};

/// The kinds both sources deliver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    NetworkPolicy,
    Node,
    EndpointSlice,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::NetworkPolicy,
        Kind::Node,
        Kind::EndpointSlice,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Node => "Node",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }

    /// Cluster-scoped kinds are keyed by name only (empty namespace in their [`ObjectKey`]).
    pub const fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }
}

/// One object of a watched kind (boxed: the kinds differ a lot in size).
#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    Service(Box<Service>),
    NetworkPolicy(Box<NetworkPolicy>),
    Node(Box<Node>),
    EndpointSlice(Box<EndpointSlice>),
}

macro_rules! object_from {
    ($($kind:ident),*) => {$(
        impl From<$kind> for Object {
            fn from(o: $kind) -> Self {
                Object::$kind(Box::new(o))
            }
        }
    )*};
}
object_from!(Namespace, Pod, Service, NetworkPolicy, Node, EndpointSlice);

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
            Object::Node(_) => Kind::Node,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
        }
    }

    /// The store key: namespace (empty for cluster-scoped kinds) and name.
    pub fn key(&self) -> ObjectKey {
        let meta = self.metadata();
        let namespace = if self.kind().namespaced() {
            meta.namespace.clone().unwrap_or_default()
        } else {
            String::new()
        };
        ObjectKey::new(namespace, meta.name.clone().unwrap_or_default())
    }
}

/// The source's own health, shared with the HTTP server: why it cannot currently read the
/// cluster (an API server that is down, a permission it lacks), per watched kind. Written as
/// soon as a watch fails — also before the first complete list — and cleared when it recovers;
/// the store keeps the last state meanwhile.
#[derive(Clone, Default)]
pub struct SourceHealth {
    errors: std::sync::Arc<std::sync::RwLock<Vec<String>>>,
    gauge: prometheus_client::metrics::gauge::Gauge,
    lists: prometheus_client::metrics::counter::Counter,
}

impl SourceHealth {
    /// Health reported through `gauge` (the number of failing watches) and `lists` (complete
    /// lists, initial and after 410 Gone or a broken watch) as well.
    pub fn new(
        gauge: prometheus_client::metrics::gauge::Gauge,
        lists: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        Self {
            errors: Default::default(),
            gauge,
            lists,
        }
    }

    /// One kind completed a list.
    pub fn listed(&self) {
        self.lists.inc();
    }

    pub fn set(&self, errors: Vec<String>) {
        self.gauge.set(errors.len() as i64);
        *self.errors.write().unwrap_or_else(|e| e.into_inner()) = errors;
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// One change to the store.
#[derive(Clone, Debug)]
pub enum Change {
    /// Create or replace one object.
    Apply(Object),
    /// Delete one object (no-op when absent).
    Delete(Kind, ObjectKey),
    /// Replace every object of a kind (initial list, re-list after 410 Gone, manifest re-scan).
    Replace(Kind, Vec<Object>),
}

/// A batch of changes from a source, applied atomically, and the source revision it brings the
/// store to.
#[derive(Clone, Debug)]
pub struct Update {
    pub changes: Vec<Change>,
    /// Manifest source: the `.revision` file read before the manifests of this batch (or a scan
    /// counter without it). Kubernetes source: the number of changes applied so far.
    pub revision: u64,
    /// When the newest change in this batch was made (manifest: file mtime) or observed
    /// (Kubernetes: when the watch event arrived). Start of the change-to-enforcement latency.
    pub changed_at: SystemTime,
    /// Problems with the source's input (invalid objects, unreadable files), replacing those of
    /// the previous update. Each names the file or object and the field.
    pub errors: Vec<String>,
    /// Where the objects were read, replacing those of the previous update (manifest source:
    /// `FILE: document N` of every object; empty for the Kubernetes source).
    pub origins: Origins,
}

/// Where each object was read: `FILE: document N` (the items of a List: the List's document).
pub type Origins = BTreeMap<(Kind, ObjectKey), String>;

/// The store both sources feed: the compiler's [`Cluster`] plus the EndpointSlices (used to name
/// the Service a flow went to).
#[derive(Clone, Debug, Default)]
pub struct ClusterStore {
    pub cluster: Cluster,
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// Latest revision applied.
    pub revision: u64,
    /// Input errors reported with the latest update.
    pub errors: Vec<String>,
    /// Where the objects were read, as of the latest update.
    pub origins: Origins,
    /// The digest term of every stored object, and their sum ([`policy_common::digest`]).
    terms: HashMap<(Kind, ObjectKey), u64>,
    digest: ObjectsDigest,
}

/// What `/status` reports of the objects behind a state: how many, and their digest.
pub use policy_common::status::ObjectsDigest;

impl ClusterStore {
    pub fn apply(&mut self, update: Update) {
        for change in update.changes {
            self.apply_change(change);
        }
        self.revision = update.revision;
        self.errors = update.errors;
        self.origins = update.origins;
    }

    /// A compile error as reported (`/status`, log): prefixed with where its object was read,
    /// when the source knows (`FILE: document N: Pod x/a: status.podIP: …`).
    pub fn describe(&self, error: &CompileError) -> String {
        let kind = match error {
            CompileError::Policy { .. } => Kind::NetworkPolicy,
            CompileError::Pod { .. } | CompileError::MapCapacity { .. } => Kind::Pod,
            CompileError::Service { .. } => Kind::Service,
            CompileError::Node { .. } => Kind::Node,
        };
        let key = ObjectKey::new(error.namespace(), error.name());
        match self.origins.get(&(kind, key)) {
            Some(origin) => format!("{origin}: {error}"),
            None => error.to_string(),
        }
    }

    fn apply_change(&mut self, change: Change) {
        match change {
            Change::Apply(object) => self.insert(object),
            Change::Delete(kind, key) => self.remove(kind, &key),
            Change::Replace(kind, objects) => {
                self.clear(kind);
                for object in objects {
                    debug_assert_eq!(object.kind(), kind);
                    self.insert(object);
                }
            }
        }
    }

    /// Count and digest of every stored object.
    pub fn digest(&self) -> ObjectsDigest {
        self.digest
    }

    fn forget(&mut self, kind: Kind, key: &ObjectKey) {
        if let Some(term) = self.terms.remove(&(kind, key.clone())) {
            self.digest.remove(term);
        }
    }

    fn insert(&mut self, object: Object) {
        let key = object.key();
        let kind = object.kind();
        self.forget(kind, &key);
        let term = policy_common::digest::object_term(
            kind.as_str(),
            &key.namespace,
            &key.name,
            object.metadata().resource_version.as_deref().unwrap_or(""),
        );
        self.terms.insert((kind, key.clone()), term);
        self.digest.add(term);
        let c = &mut self.cluster;
        match object {
            Object::Namespace(o) => {
                c.namespaces.insert(key.name, *o);
            }
            Object::Node(o) => {
                c.nodes.insert(key.name, *o);
            }
            Object::Pod(o) => {
                c.pods.insert(key, (*o).into());
            }
            Object::Service(o) => {
                c.services.insert(key, *o);
            }
            Object::NetworkPolicy(o) => {
                c.policies.insert(key, *o);
            }
            Object::EndpointSlice(o) => {
                self.endpoint_slices.insert(key, *o);
            }
        }
    }

    fn remove(&mut self, kind: Kind, key: &ObjectKey) {
        self.forget(kind, key);
        let c = &mut self.cluster;
        match kind {
            Kind::Namespace => drop(c.namespaces.remove(&key.name)),
            Kind::Node => drop(c.nodes.remove(&key.name)),
            Kind::Pod => drop(c.pods.remove(key)),
            Kind::Service => drop(c.services.remove(key)),
            Kind::NetworkPolicy => drop(c.policies.remove(key)),
            Kind::EndpointSlice => drop(self.endpoint_slices.remove(key)),
        }
    }

    fn clear(&mut self, kind: Kind) {
        let gone: Vec<ObjectKey> = self
            .terms
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, key)| key.clone())
            .collect();
        for key in &gone {
            self.forget(kind, key);
        }
        let c = &mut self.cluster;
        match kind {
            Kind::Namespace => c.namespaces.clear(),
            Kind::Node => c.nodes.clear(),
            Kind::Pod => c.pods.clear(),
            Kind::Service => c.services.clear(),
            Kind::NetworkPolicy => c.policies.clear(),
            Kind::EndpointSlice => self.endpoint_slices.clear(),
        }
    }

    /// Backend (address, port, protocol) → the Service whose EndpointSlice lists it.
    pub fn service_backends(&self) -> HashMap<(IpAddr, u16, u8), ObjectKey> {
        let mut out = HashMap::new();
        for (key, slice) in &self.endpoint_slices {
            let Some(service) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
            else {
                continue;
            };
            let service = ObjectKey::new(key.namespace.clone(), service.clone());
            for port in slice.ports.iter().flatten() {
                let Some(number) = port.port.and_then(|p| u16::try_from(p).ok()) else {
                    continue;
                };
                let protocol = protocol_number(port.protocol.as_deref());
                for endpoint in &slice.endpoints {
                    for addr in endpoint.addresses.iter().filter_map(|a| a.parse().ok()) {
                        out.insert((addr, number, protocol), service.clone());
                    }
                }
            }
        }
        out
    }
}

/// Kubernetes protocol name (default TCP) → IP protocol number.
pub fn protocol_number(protocol: Option<&str>) -> u8 {
    match protocol.unwrap_or("TCP") {
        "UDP" => policy_common::proto::UDP,
        "SCTP" => policy_common::proto::SCTP,
        _ => policy_common::proto::TCP,
    }
}

/// Removes what the agent never reads from an object before it is stored: managed fields and the
/// last-applied annotation (often the largest part of an object).
pub fn strip(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str) -> Object {
        let mut p = Pod::default();
        p.metadata.namespace = Some(ns.into());
        p.metadata.name = Some(name.into());
        Object::from(p)
    }

    fn update(changes: Vec<Change>, revision: u64) -> Update {
        Update {
            changes,
            revision,
            changed_at: SystemTime::now(),
            errors: vec![],
            origins: Origins::new(),
        }
    }

    #[test]
    fn apply_delete_replace() {
        let mut store = ClusterStore::default();
        store.apply(update(
            vec![Change::Apply(pod("a", "p1")), Change::Apply(pod("a", "p2"))],
            1,
        ));
        assert_eq!(store.cluster.pods.len(), 2);
        assert_eq!(store.revision, 1);
        store.apply(update(
            vec![Change::Delete(Kind::Pod, ObjectKey::new("a", "p1"))],
            2,
        ));
        assert_eq!(
            store.cluster.pods.keys().cloned().collect::<Vec<_>>(),
            vec![ObjectKey::new("a", "p2")]
        );
        store.apply(update(
            vec![Change::Replace(Kind::Pod, vec![pod("b", "q")])],
            3,
        ));
        assert_eq!(
            store.cluster.pods.keys().cloned().collect::<Vec<_>>(),
            vec![ObjectKey::new("b", "q")]
        );
    }

    #[test]
    fn endpoint_slices_of_both_address_types_name_their_service() {
        let slice = |name: &str, address_type: &str, addresses: &[&str]| -> Object {
            let endpoints: Vec<serde_json::Value> = addresses
                .iter()
                .map(|a| serde_json::json!({"addresses": [a]}))
                .collect();
            let s: EndpointSlice = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "x",
                    "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": address_type,
                "endpoints": endpoints,
                "ports": [{"port": 8080, "protocol": "TCP"}],
            }))
            .unwrap();
            Object::from(s)
        };
        let mut store = ClusterStore::default();
        store.apply(update(
            vec![
                Change::Apply(slice("web-v4", "IPv4", &["10.244.1.5"])),
                Change::Apply(slice(
                    "web-v6",
                    "IPv6",
                    &["fd00:10:244:1::5", "fd00:10:244:2:0:0:0:7"],
                )),
                Change::Apply(slice("web-fqdn", "FQDN", &["web.example.com"])),
            ],
            1,
        ));
        let backends = store.service_backends();
        let web = ObjectKey::new("x", "web");
        for addr in ["10.244.1.5", "fd00:10:244:1::5", "fd00:10:244:2::7"] {
            let key = (addr.parse().unwrap(), 8080, policy_common::proto::TCP);
            assert_eq!(backends.get(&key), Some(&web), "{addr}");
        }
        assert_eq!(backends.len(), 3);
    }

    #[test]
    fn cluster_scoped_keys_ignore_namespace() {
        let mut ns = Namespace::default();
        ns.metadata.name = Some("x".into());
        ns.metadata.namespace = Some("ignored".into());
        assert_eq!(Object::from(ns).key(), ObjectKey::new("", "x"));
    }

    fn versioned(ns: &str, name: &str, rv: &str) -> Object {
        let mut o = pod(ns, name);
        if let Object::Pod(p) = &mut o {
            p.metadata.resource_version = Some(rv.into());
        }
        o
    }

    /// The digest a client computes from a list of (namespace, name, resourceVersion) pods.
    fn listed(pods: &[(&str, &str, &str)]) -> ObjectsDigest {
        let mut d = ObjectsDigest::default();
        for (ns, name, rv) in pods {
            d.add(policy_common::digest::object_term("Pod", ns, name, rv));
        }
        d
    }

    #[test]
    fn digest_follows_every_change() {
        let mut store = ClusterStore::default();
        assert_eq!(store.digest(), listed(&[]));
        store.apply(update(
            vec![
                Change::Apply(versioned("a", "p1", "10")),
                Change::Apply(versioned("a", "p2", "11")),
            ],
            1,
        ));
        assert_eq!(
            store.digest(),
            listed(&[("a", "p1", "10"), ("a", "p2", "11")])
        );
        // A new version replaces the old term; a relabel is a new resourceVersion.
        store.apply(update(vec![Change::Apply(versioned("a", "p1", "12"))], 2));
        assert_eq!(
            store.digest(),
            listed(&[("a", "p1", "12"), ("a", "p2", "11")])
        );
        assert_ne!(
            store.digest(),
            listed(&[("a", "p1", "10"), ("a", "p2", "11")])
        );
        store.apply(update(
            vec![Change::Delete(Kind::Pod, ObjectKey::new("a", "p2"))],
            3,
        ));
        assert_eq!(store.digest(), listed(&[("a", "p1", "12")]));
        store.apply(update(
            vec![Change::Replace(Kind::Pod, vec![versioned("b", "q", "20")])],
            4,
        ));
        assert_eq!(store.digest(), listed(&[("b", "q", "20")]));
        // Other kinds count too, and a re-list of pods leaves them alone.
        let mut ns = Namespace::default();
        ns.metadata.name = Some("b".into());
        ns.metadata.resource_version = Some("5".into());
        store.apply(update(vec![Change::Apply(Object::from(ns))], 5));
        store.apply(update(vec![Change::Replace(Kind::Pod, vec![])], 6));
        assert_eq!(
            store.digest(),
            ObjectsDigest {
                count: 1,
                digest: policy_common::digest::object_term("Namespace", "", "b", "5"),
            }
        );
    }
}
