//! The cluster state the toolkit reasons about: read from manifest files, from a cluster through
//! the current kubeconfig context, or from a lab, into the same [`ClusterStore`] the agent fills.
//!
//! Files may also hold workloads (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob):
//! each stands for the pods it would create, as one pod named after the workload with the labels
//! and ports of its pod template and no address yet.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, PodSpec, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::{Cluster, ObjectKey};
use crate::sources::{Change, ClusterStore, Object, documents, manifest};

/// Where the state comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Files or directories of YAML (multi-document), read recursively.
    Files(Vec<PathBuf>),
    /// The cluster of a kubeconfig (`None`: `$KUBECONFIG` or `~/.kube/config`, current context).
    Cluster(Option<PathBuf>),
    /// A lab made by `cargo xtask lab up`, by prefix.
    Lab(String),
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{count} input error(s):\n  {}", errors.join("\n  "))]
    Invalid { count: usize, errors: Vec<String> },
    #[error("the cluster: {0}")]
    Kubernetes(String),
    #[error(
        "lab {prefix:?}: no state directory {dir} (is the lab up? set CARGO_TARGET_DIR to the \
         target directory it was started from)"
    )]
    NoLab { prefix: String, dir: String },
}

/// Workloads, by kind: where their pod template is.
const WORKLOADS: &[(&str, &[&str])] = &[
    ("Deployment", &["spec", "template"]),
    ("StatefulSet", &["spec", "template"]),
    ("DaemonSet", &["spec", "template"]),
    ("ReplicaSet", &["spec", "template"]),
    ("Job", &["spec", "template"]),
    ("CronJob", &["spec", "jobTemplate", "spec", "template"]),
];

/// The state: the store, and which workload each template pod stands for.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub store: ClusterStore,
    /// Pods made from a workload's template → `Kind/name` of the workload.
    pub templates: BTreeMap<ObjectKey, String>,
}

impl State {
    pub fn cluster(&self) -> &Cluster {
        &self.store.cluster
    }

    /// Deletes the objects of these kinds and names.
    pub fn delete(&mut self, objects: &[Object]) {
        self.change(
            objects
                .iter()
                .map(|o| Change::Delete(o.kind(), o.key()))
                .collect(),
        );
    }

    /// Adds or replaces objects (create-or-replace, like `kubectl apply`).
    pub fn apply(&mut self, objects: Vec<Object>) {
        self.change(objects.into_iter().map(Change::Apply).collect());
    }

    fn change(&mut self, changes: Vec<Change>) {
        self.store.apply(crate::sources::Update {
            changes,
            revision: 0,
            changed_at: std::time::SystemTime::UNIX_EPOCH,
            errors: Vec::new(),
            origins: Default::default(),
        });
    }
}

/// Reads the state from a source. Input errors (a document that does not parse, an unknown kind)
/// fail the load, each naming its file, document and field.
pub fn load(source: &Source) -> Result<State, LoadError> {
    match source {
        Source::Files(paths) => {
            let (objects, templates) = read_files(paths)?;
            let mut state = State {
                templates,
                ..State::default()
            };
            state.apply(objects);
            Ok(state)
        }
        Source::Cluster(kubeconfig) => from_cluster(kubeconfig.as_deref(), None),
        Source::Lab(prefix) => from_lab(prefix),
    }
}

/// Every object of the files and directories, and the workload behind each template pod.
pub fn read_files(
    paths: &[PathBuf],
) -> Result<(Vec<Object>, BTreeMap<ObjectKey, String>), LoadError> {
    let mut files = Vec::new();
    for path in paths {
        let meta = fs::metadata(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        if meta.is_dir() {
            manifest::manifest_files(path, &mut files).map_err(|source| LoadError::Read {
                path: path.display().to_string(),
                source,
            })?;
        } else {
            files.push(path.clone());
        }
    }
    let mut errors = Vec::new();
    let mut objects = Vec::new();
    let mut templates = BTreeMap::new();
    for file in &files {
        let text = fs::read_to_string(file).map_err(|source| LoadError::Read {
            path: file.display().to_string(),
            source,
        })?;
        read_text(file, &text, &mut errors, &mut objects, &mut templates);
    }
    if !errors.is_empty() {
        return Err(LoadError::Invalid {
            count: errors.len(),
            errors,
        });
    }
    // A Pod of the same name wins over a workload's template pod.
    let pods: std::collections::BTreeSet<ObjectKey> = objects
        .iter()
        .filter(|o| matches!(o, Object::Pod(_)))
        .map(Object::key)
        .filter(|k| !templates.contains_key(k))
        .collect();
    templates.retain(|k, _| !pods.contains(k));
    Ok((objects, templates))
}

fn read_text(
    file: &Path,
    text: &str,
    errors: &mut Vec<String>,
    objects: &mut Vec<Object>,
    templates: &mut BTreeMap<ObjectKey, String>,
) {
    for (index, document) in documents::documents(text) {
        let at = format!("{}: document {index}", file.display());
        let value = match document {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("{at}: {e}"));
                continue;
            }
        };
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        match WORKLOADS.iter().find(|(k, _)| *k == kind) {
            Some((kind, path)) => match template_pod(&value, path) {
                Ok(pod) => {
                    let key = Object::from(pod.clone()).key();
                    templates.insert(key.clone(), format!("{kind}/{}", key.name));
                    objects.push(pod.into());
                }
                Err(field) => errors.push(format!("{at}: {kind}: {field}")),
            },
            None => manifest::parse_value(&at, value, errors, objects),
        }
    }
}

/// Field `key` of `value` as a `T` (absent: `T::default()`); errors name `field`.
fn field<T: serde::de::DeserializeOwned + Default>(
    value: &serde_yaml::Value,
    key: &str,
    field: &str,
) -> Result<T, String> {
    value
        .get(key)
        .cloned()
        .map(serde_yaml::from_value)
        .transpose()
        .map_err(|e| format!("{field}: {e}"))
        .map(Option::unwrap_or_default)
}

/// The pod a workload's template describes, named after the workload.
fn template_pod(value: &serde_yaml::Value, path: &[&str]) -> Result<Pod, String> {
    let meta: ObjectMeta = field(value, "metadata", "metadata")?;
    let name = meta.name.clone().ok_or("metadata.name: missing")?;
    let at = path.join(".");
    let mut template = value;
    for step in path {
        template = template.get(step).ok_or_else(|| format!("{at}: missing"))?;
    }
    let template_meta: ObjectMeta = field(template, "metadata", &format!("{at}.metadata"))?;
    if let Some(e) = template_meta.labels.as_ref().and_then(|l| {
        crate::model::meta::labels(&format!("{at}.metadata.labels"), l)
            .into_iter()
            .next()
    }) {
        return Err(e.to_string());
    }
    let spec: PodSpec = field(template, "spec", &format!("{at}.spec"))?;
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(meta.namespace.unwrap_or_else(|| "default".into())),
            labels: template_meta.labels,
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// Lists every kind the agent watches from a cluster. With `netns`, the client runs inside that
/// network namespace (a lab's control plane).
fn from_cluster(kubeconfig: Option<&Path>, netns: Option<&Path>) -> Result<State, LoadError> {
    let kube_err = |e: &dyn std::fmt::Display| LoadError::Kubernetes(e.to_string());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| kube_err(&e))?;
    if let Some(netns) = netns {
        let f = fs::File::open(netns).map_err(|source| LoadError::Read {
            path: netns.display().to_string(),
            source,
        })?;
        // SAFETY: setns on an open namespace file; this thread is the only one using the network.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
            return Err(kube_err(&format!(
                "entering {}: {}",
                netns.display(),
                std::io::Error::last_os_error()
            )));
        }
    }
    let objects = runtime.block_on(async {
        let client = crate::sources::kubernetes::client(kubeconfig)
            .await
            .map_err(|e| kube_err(&e))?;
        let mut objects: Vec<Object> = Vec::new();
        macro_rules! list {
            ($t:ty) => {{
                let api: kube::Api<$t> = kube::Api::all(client.clone());
                let list = api
                    .list(&Default::default())
                    .await
                    .map_err(|e| kube_err(&format!("listing {}: {e}", stringify!($t))))?;
                objects.extend(list.items.into_iter().map(Object::from));
            }};
        }
        list!(Namespace);
        list!(Node);
        list!(Pod);
        list!(Service);
        list!(NetworkPolicy);
        list!(EndpointSlice);
        Ok::<_, LoadError>(objects)
    })?;
    let mut state = State::default();
    state.apply(objects);
    Ok(state)
}

/// A lab's state: its manifest directory, or (real-API mode) its API server, reached from the
/// lab's control-plane network namespace.
fn from_lab(prefix: &str) -> Result<State, LoadError> {
    let dir = lab_dir(prefix);
    let kubeconfig = dir.join("kube").join("admin.kubeconfig");
    if kubeconfig.exists() {
        let netns = PathBuf::from(format!("/run/netns/{prefix}-cp"));
        return from_cluster(Some(&kubeconfig), Some(&netns));
    }
    let manifests = dir.join("manifests");
    if !manifests.is_dir() {
        return Err(LoadError::NoLab {
            prefix: prefix.into(),
            dir: dir.display().to_string(),
        });
    }
    load(&Source::Files(vec![manifests]))
}

/// The state directory of lab `prefix`: under `$CARGO_TARGET_DIR`, else the `target` directory
/// of the working directory or one of its parents that holds labs.
pub fn lab_dir(prefix: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let cwd = std::env::current_dir().ok()?;
            cwd.ancestors()
                .map(|d| d.join("target"))
                .find(|t| t.join("lab").is_dir())
        })
        .unwrap_or_else(|| PathBuf::from("target"));
    target.join("lab").join(prefix)
}
