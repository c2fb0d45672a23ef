//! Every shipped object must parse into its k8s-openapi type (Kubernetes 1.34 API), and nothing may be lost on the
//! way: k8s-openapi ignores fields it does not know, so a misspelt field (`mountPropogation`) would parse and then
//! be dropped by the API server too. Serializing the typed object back and comparing it with the source catches that.

use k8s_openapi::{
    Resource,
    api::{
        apps::v1::DaemonSet,
        core::v1::{Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use super::{json_differences, object_ref};

/// One object of every kind deploy/ ships, parsed.
pub enum Typed {
    Namespace(Box<Namespace>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    DaemonSet(Box<DaemonSet>),
}

/// Parses `object` into the k8s-openapi type its apiVersion and kind name, and checks the round trip is lossless.
pub fn parse(object: &Value) -> Result<Typed, String> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    match (api_version, kind) {
        (Namespace::API_VERSION, Namespace::KIND) => {
            lossless::<Namespace>(object).map(|t| Typed::Namespace(Box::new(t)))
        }
        (ServiceAccount::API_VERSION, ServiceAccount::KIND) => {
            lossless::<ServiceAccount>(object).map(|t| Typed::ServiceAccount(Box::new(t)))
        }
        (ClusterRole::API_VERSION, ClusterRole::KIND) => {
            lossless::<ClusterRole>(object).map(|t| Typed::ClusterRole(Box::new(t)))
        }
        (ClusterRoleBinding::API_VERSION, ClusterRoleBinding::KIND) => {
            lossless::<ClusterRoleBinding>(object).map(|t| Typed::ClusterRoleBinding(Box::new(t)))
        }
        (DaemonSet::API_VERSION, DaemonSet::KIND) => {
            lossless::<DaemonSet>(object).map(|t| Typed::DaemonSet(Box::new(t)))
        }
        _ => Err(format!(
            "{}: no typed check for apiVersion {api_version:?} kind {kind:?} \
             (add it to tests/tests/deploy_support/typed.rs)",
            object_ref(object)
        )),
    }
}

/// Parses `object` as `K`; fails if the typed object does not serialize back to exactly the source.
pub fn lossless<K: Resource + Serialize + DeserializeOwned>(object: &Value) -> Result<K, String> {
    let typed: K = serde_json::from_value(object.clone())
        .map_err(|e| format!("{}: not a valid {}: {e}", object_ref(object), K::KIND))?;
    let back = serde_json::to_value(&typed).map_err(|e| format!("{}: {e}", object_ref(object)))?;
    let differences = json_differences(object, &back);
    if differences.is_empty() {
        Ok(typed)
    } else {
        Err(format!(
            "{}: fields the {} type does not carry (misspelt or misplaced?):\n  {}",
            object_ref(object),
            K::KIND,
            differences.join("\n  ")
        ))
    }
}
