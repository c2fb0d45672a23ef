//! The cluster state the compiler reads: plain k8s-openapi objects keyed by namespace and name.
//!
//! Both sources (the Kubernetes API and a manifest directory) fill the same [`Cluster`], so what the
//! lab proves is what a cluster runs.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    networking::v1::NetworkPolicy,
};

/// Namespace and name of a namespaced object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Every object the agent watches.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// By name.
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectKey, Pod>,
    pub policies: BTreeMap<ObjectKey, NetworkPolicy>,
    pub services: BTreeMap<ObjectKey, Service>,
    /// By name.
    pub nodes: BTreeMap<String, Node>,
}
