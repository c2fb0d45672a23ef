//! What the compiler reports about input it cannot use. Compilation never stops on these: the
//! offending object is handled fail-closed (see [`CompileError::Policy`]) and everything else still
//! compiles.

use crate::model::ObjectKey;

/// One problem with one object, naming the object and the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// A NetworkPolicy the API server would reject. The policy is enforced fail-closed: the pods it
    /// selects are isolated in the directions it declares and nothing is allowed by it. When the
    /// `podSelector` itself is invalid, every pod of its namespace is isolated in those directions.
    #[error(
        "NetworkPolicy {namespace}/{name}: {field}: {reason} (rejected: selected pods stay isolated, nothing allowed by it)"
    )]
    Policy {
        namespace: String,
        name: String,
        field: String,
        reason: String,
    },
    /// A Pod field that cannot be used (an address that does not parse, no free endpoint id). The
    /// rest of the pod is still used.
    #[error("Pod {namespace}/{name}: {field}: {reason}")]
    Pod {
        namespace: String,
        name: String,
        field: String,
        reason: String,
    },
    /// A Service address that does not parse; it is not added to SERVICES.
    #[error("Service {namespace}/{name}: {field}: {reason}")]
    Service {
        namespace: String,
        name: String,
        field: String,
        reason: String,
    },
    /// A local pod whose allow entries do not fit a map: one POLICY group (peer identity,
    /// direction, protocol) needs more port ranges, after merging, than a group holds
    /// ([`policy_common::POLICY_MAX_RANGES`]). The pod gets no allow entries and is marked
    /// `NOT_PROGRAMMED`: its new flows are dropped in both directions (fail closed) until the
    /// policies selecting it fit again. Other pods are unaffected.
    #[error(
        "Pod {namespace}/{name}: map {map}: {direction} {protocol} port ranges for peer identity {identity} need {ranges} slots, a group holds {limit} (not programmed: new flows dropped in both directions)"
    )]
    MapCapacity {
        namespace: String,
        name: String,
        map: &'static str,
        identity: u32,
        direction: &'static str,
        protocol: &'static str,
        ranges: usize,
        limit: usize,
    },
    /// A Node address that does not parse. `namespace` is empty (Nodes are cluster-scoped).
    #[error("Node {name}: {field}: {reason}")]
    Node {
        namespace: String,
        name: String,
        field: String,
        reason: String,
    },
}

impl CompileError {
    pub(crate) fn policy(
        key: &ObjectKey,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        CompileError::Policy {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn pod(
        key: &ObjectKey,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        CompileError::Pod {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn service(
        key: &ObjectKey,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        CompileError::Service {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn node(name: &str, field: impl Into<String>, reason: impl Into<String>) -> Self {
        CompileError::Node {
            namespace: String::new(),
            name: name.to_owned(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Namespace of the object (empty for Nodes).
    pub fn namespace(&self) -> &str {
        match self {
            CompileError::Policy { namespace, .. }
            | CompileError::Pod { namespace, .. }
            | CompileError::MapCapacity { namespace, .. }
            | CompileError::Service { namespace, .. }
            | CompileError::Node { namespace, .. } => namespace,
        }
    }

    /// Name of the object.
    pub fn name(&self) -> &str {
        match self {
            CompileError::Policy { name, .. }
            | CompileError::Pod { name, .. }
            | CompileError::MapCapacity { name, .. }
            | CompileError::Service { name, .. }
            | CompileError::Node { name, .. } => name,
        }
    }

    /// Path of the offending field, e.g. `spec.ingress[0].from[1].ipBlock.except[0]` (empty for
    /// [`CompileError::MapCapacity`], which no single field causes).
    pub fn field(&self) -> &str {
        match self {
            CompileError::MapCapacity { .. } => "",
            CompileError::Policy { field, .. }
            | CompileError::Pod { field, .. }
            | CompileError::Service { field, .. }
            | CompileError::Node { field, .. } => field,
        }
    }
}
