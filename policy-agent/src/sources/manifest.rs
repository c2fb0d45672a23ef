//! The manifest-directory source: multi-document YAML files (`*.yaml`, `*.yml`, `*.json`, in the
//! directory and its subdirectories; names starting with `.` are ignored) holding Namespaces,
//! Pods, Services, NetworkPolicies, Nodes and EndpointSlices, re-read whenever they change.
//!
//! Change detection polls every file's size, mtime and inode (default every 50 ms; cheap, and
//! works on every filesystem and inside any mount namespace, unlike inotify on bind mounts).
//!
//! # Revision protocol
//!
//! A file `.revision` in the directory may hold a decimal `u64`. Every scan reads `.revision`
//! *first*, then the manifests, so the manifests read are at least as new as the revision: once
//! the maps compiled from that scan are in the kernel, the agent reports that revision as
//! enforced (`/status`). Callers write manifests, then `.revision`, then wait for
//! `enforced_revision` ≥ what they wrote. Without `.revision` the revision counts scans that found
//! a change. A `.revision` caught mid-write (empty or not a number) keeps the previous revision:
//! the scan's newer manifests are applied, and the next poll sees the finished file.
//!
//! # What the API server would do, done here
//!
//! - Every Namespace carries `kubernetes.io/metadata.name=<name>`.
//! - Namespaces referenced by a Pod, Service or NetworkPolicy but not defined exist implicitly
//!   (with only that label), as the lab creates them.
//! - Objects without `metadata.namespace` are in `default`.
//!
//! # Invalid input
//!
//! Every document is split off and pre-scanned before serde_yaml parses it ([`documents`]): one
//! over 1 MiB, nested over 100 deep, of over 50,000 nodes or with many anchors and aliases is
//! reported (file, document, limit) and skipped unparsed, so one bad file costs the scan
//! microseconds, not seconds. A document that does not parse is reported and skipped; the
//! documents after it are still read.
//!
//! An object that does not parse, lacks a name, has the wrong `apiVersion`, or carries labels or
//! annotations the API server would reject ([`meta`]) is reported (file, document, object,
//! field) and skipped; the rest of the directory is applied.
//!
//! A NetworkPolicy that cannot be enforced as written fails closed instead, so a mistake never
//! opens traffic the author meant to restrict: it is replaced by a policy that isolates the pods
//! it selects and allows nothing. When its spec parses (only its metadata is wrong), the stand-in
//! keeps its `podSelector` and the directions it declares; when even the spec does not parse, it
//! isolates both directions, and every pod of its namespace if the `podSelector` is unreadable.
//! A policy without `metadata.name` is keyed `<unnamed: FILE: document N>` (unique and
//! readable).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    hash::{Hash, Hasher},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::{NetworkPolicy, NetworkPolicySpec},
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Change, Kind, Object, Origins, Update, documents, strip};
use crate::model::{NAMESPACE_NAME_LABEL, ObjectKey, meta};
use policy_common::Direction;

/// Name of the revision file inside the manifest directory.
pub use policy_common::status::REVISION_FILE;

/// Annotation set on the deny-all stand-in for a NetworkPolicy that did not parse.
pub const INVALID_ANNOTATION: &str = "policy-agent.io/invalid";

/// The result of reading the directory once.
#[derive(Debug, Default)]
pub struct Scan {
    /// Content of `.revision`, read before any manifest.
    pub revision: RevisionFile,
    pub objects: BTreeMap<Kind, Vec<Object>>,
    /// One line per problem, naming file, document, object and field.
    pub errors: Vec<String>,
    /// Newest mtime among `.revision` and the manifests.
    pub newest: Option<SystemTime>,
    /// Where each object was read (`FILE: document N`); implicit namespaces have none.
    pub origins: Origins,
}

impl Scan {
    /// The scan as a store update replacing every kind.
    pub fn into_update(self, revision: u64) -> Update {
        let mut objects = self.objects;
        let changes = Kind::ALL
            .iter()
            .map(|kind| Change::Replace(*kind, objects.remove(kind).unwrap_or_default()))
            .collect();
        Update {
            changes,
            revision,
            changed_at: self.newest.unwrap_or_else(SystemTime::now),
            errors: self.errors,
            origins: self.origins,
        }
    }
}

/// What `.revision` held when a scan started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RevisionFile {
    #[default]
    Missing,
    Valid(u64),
    /// Empty or not a decimal u64 (being written, or wrong).
    Invalid,
}

impl RevisionFile {
    /// The revision to report for a scan, given the last one reported.
    pub fn next(self, last: u64) -> u64 {
        match self {
            RevisionFile::Valid(v) => v,
            RevisionFile::Missing => last + 1,
            RevisionFile::Invalid => last,
        }
    }
}

/// What change detection compares: `.revision`'s content and every manifest's identity.
#[derive(Debug, Default, PartialEq, Eq)]
struct Fingerprint {
    revision: Option<String>,
    files: Vec<(PathBuf, u64, i64, i64, u64)>,
}

/// Reads `.revision`, then every manifest, into objects.
pub fn scan(dir: &Path) -> Scan {
    Scanner::default().scan(dir)
}

/// One file as last parsed: content hash, objects with where in the file, errors.
type ParsedFile = (u64, Vec<(String, Object)>, Vec<String>);

/// Scans a directory repeatedly, parsing only files whose content changed since the last scan.
#[derive(Default)]
pub struct Scanner {
    /// Path → what was parsed from it.
    parsed: HashMap<PathBuf, ParsedFile>,
}

impl Scanner {
    /// Reads `.revision`, then every manifest, into objects.
    pub fn scan(&mut self, dir: &Path) -> Scan {
        let mut scan = Scan::default();
        let (revision_text, revision_mtime) = read_revision(dir);
        scan.newest = revision_mtime;
        scan.revision = parse_revision(revision_text.as_deref(), &mut scan.errors);
        let mut files = Vec::new();
        if let Err(e) = manifest_files(dir, &mut files) {
            scan.errors.push(format!("{}: {e}", dir.display()));
        }
        self.parsed.retain(|p, _| files.contains(p));
        let mut by_key: BTreeMap<(Kind, ObjectKey), (PathBuf, String, Object)> = BTreeMap::new();
        for path in files {
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    scan.errors.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            if let Ok(mtime) = fs::metadata(&path).and_then(|m| m.modified()) {
                scan.newest = scan.newest.max(Some(mtime));
            }
            let hash = {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                text.hash(&mut h);
                h.finish()
            };
            let (_, objects, errors) = match self.parsed.get(&path) {
                Some(entry) if entry.0 == hash => entry,
                _ => {
                    let mut errors = Vec::new();
                    let objects = parse_file(&path, &text, &mut errors);
                    self.parsed.insert(path.clone(), (hash, objects, errors));
                    &self.parsed[&path]
                }
            };
            scan.errors.extend(errors.iter().cloned());
            for (at, object) in objects {
                let key = (object.kind(), object.key());
                if let Some((previous, ..)) = by_key.get(&key) {
                    scan.errors.push(format!(
                        "{}: {} {} is also defined in {}; the later file wins",
                        path.display(),
                        key.0.as_str(),
                        key.1,
                        previous.display()
                    ));
                }
                by_key.insert(key, (path.clone(), at.clone(), object.clone()));
            }
        }
        for ((kind, key), (_, at, object)) in by_key {
            scan.objects.entry(kind).or_default().push(object);
            scan.origins.insert((kind, key), at);
        }
        add_implicit_namespaces(&mut scan.objects);
        scan
    }
}

fn read_revision(dir: &Path) -> (Option<String>, Option<SystemTime>) {
    let path = dir.join(REVISION_FILE);
    let text = fs::read_to_string(&path).ok();
    let mtime = fs::metadata(&path).and_then(|m| m.modified()).ok();
    (text, mtime)
}

fn parse_revision(text: Option<&str>, errors: &mut Vec<String>) -> RevisionFile {
    let Some(text) = text.map(str::trim) else {
        return RevisionFile::Missing;
    };
    match text.parse() {
        Ok(v) => RevisionFile::Valid(v),
        // Caught between truncation and write: not worth an error.
        Err(_) if text.is_empty() => RevisionFile::Invalid,
        Err(e) => {
            errors.push(format!(
                "{REVISION_FILE}: {text:?} is not a decimal u64: {e}"
            ));
            RevisionFile::Invalid
        }
    }
}

pub fn manifest_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            manifest_files(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

fn fingerprint(dir: &Path) -> Fingerprint {
    let (revision, _) = read_revision(dir);
    let mut files = Vec::new();
    let _ = manifest_files(dir, &mut files);
    let files = files
        .into_iter()
        .filter_map(|path| {
            let m = fs::metadata(&path).ok()?;
            Some((path, m.len(), m.mtime(), m.mtime_nsec(), m.ino()))
        })
        .collect();
    Fingerprint { revision, files }
}

/// Parses every document of one file, each bounded by [`documents::LIMITS`] before it is parsed.
/// Problems go to `errors`; a document that is too costly or broken is reported and skipped, and
/// the documents after it are still read.
pub fn parse_documents(path: &Path, text: &str, errors: &mut Vec<String>) -> Vec<Object> {
    parse_file(path, text, errors)
        .into_iter()
        .map(|(_, object)| object)
        .collect()
}

/// [`parse_documents`], each object with where it was read (`FILE: document N`).
fn parse_file(path: &Path, text: &str, errors: &mut Vec<String>) -> Vec<(String, Object)> {
    let mut out = Vec::new();
    let mut objects = Vec::new();
    for (index, document) in documents::documents(text) {
        let at = format!("{}: document {index}", path.display());
        match document {
            Ok(serde_yaml::Value::Null) => {}
            Ok(value) => {
                parse_value(&at, value, errors, &mut objects);
                // A List's items are all of this document.
                out.extend(objects.drain(..).map(|o| (at.clone(), o)));
            }
            Err(e) => errors.push(format!("{at}: {e}")),
        }
    }
    out
}

/// Parses one document (`at` names its file and index) into `out`, problems into `errors`.
pub fn parse_value(
    at: &str,
    value: serde_yaml::Value,
    errors: &mut Vec<String>,
    out: &mut Vec<Object>,
) {
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).unwrap_or("");
    let kind = field("kind").to_owned();
    let api_version = field("apiVersion").to_owned();
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_owned();
    let label = if name.is_empty() {
        kind.clone()
    } else {
        format!("{kind} {name:?}")
    };
    if kind == "List" {
        match value.get("items").and_then(|i| i.as_sequence()) {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    parse_value(&format!("{at} item {}", i + 1), item.clone(), errors, out);
                }
            }
            None => errors.push(format!("{at}: List: items: missing or not a list")),
        }
        return;
    }
    let expected = match kind.as_str() {
        "Namespace" | "Pod" | "Service" | "Node" => "v1",
        "NetworkPolicy" => "networking.k8s.io/v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        "" => {
            errors.push(format!("{at}: kind: missing"));
            return;
        }
        other => {
            errors.push(format!(
                "{at}: kind: {other:?} is not one of Namespace, Pod, Service, NetworkPolicy, \
                 Node, EndpointSlice"
            ));
            return;
        }
    };
    let is_policy = kind == "NetworkPolicy";
    // Problems that make the object unusable as written, each `field: reason`.
    let mut problems = Vec::new();
    if api_version != expected {
        problems.push(format!(
            "apiVersion: {api_version:?}, expected {expected:?}"
        ));
    }
    if name.is_empty() {
        problems.push("metadata.name: missing".to_owned());
    }
    if !problems.is_empty() && !is_policy {
        for p in problems {
            errors.push(format!("{at}: {label}: {p}"));
        }
        return;
    }
    // A policy of the wrong apiVersion is still read as a v1 policy, to fail closed on what it
    // selects (k8s-openapi checks apiVersion).
    let corrected;
    let value = if api_version != expected {
        let mut v = value.clone();
        if let Some(m) = v.as_mapping_mut() {
            m.insert("apiVersion".into(), expected.into());
        }
        corrected = v;
        &corrected
    } else {
        &value
    };
    let parsed = match kind.as_str() {
        "Namespace" => typed::<Namespace>(value).map(Object::from),
        "Pod" => typed::<Pod>(value).map(Object::from),
        "Service" => typed::<Service>(value).map(Object::from),
        "Node" => typed::<Node>(value).map(Object::from),
        "EndpointSlice" => typed::<EndpointSlice>(value).map(Object::from),
        _ => typed::<NetworkPolicy>(value).map(Object::from),
    };
    let spec = match parsed {
        Ok(object) => {
            problems.extend(
                meta::object_meta(object.metadata())
                    .iter()
                    .map(ToString::to_string),
            );
            if problems.is_empty() {
                out.push(normalize(object));
                return;
            }
            match object {
                Object::NetworkPolicy(np) => Some(np.spec.unwrap_or_default()),
                _ => {
                    for p in problems {
                        errors.push(format!("{at}: {label}: {p}; skipped"));
                    }
                    return;
                }
            }
        }
        Err(e) if is_policy => {
            problems.push(e);
            None
        }
        Err(e) => {
            errors.push(format!("{at}: {label}: {e}; skipped"));
            return;
        }
    };
    // A NetworkPolicy that cannot be enforced as written fails closed.
    let name = if name.is_empty() {
        format!("<unnamed: {at}>")
    } else {
        name
    };
    let stand_in = normalize(Object::from(fail_closed_policy(
        value,
        name,
        spec.as_ref(),
        &problems.join("; "),
    )));
    let key = stand_in.key();
    for p in problems {
        errors.push(format!(
            "{at}: {label}: {p}; enforcing it as deny-all for the pods it selects \
             (NetworkPolicy {key})"
        ));
    }
    out.push(stand_in);
}

/// Deserializes straight from the `Value`; when that fails, again from the re-serialized text,
/// because only then does serde_yaml name the field path in its error (both use the same
/// `Deserialize` impl, so they accept exactly the same objects).
fn typed<T: DeserializeOwned>(value: &serde_yaml::Value) -> Result<T, String> {
    if let Ok(object) = serde::Deserialize::deserialize(value) {
        return Ok(object);
    }
    let text = serde_yaml::to_string(value).map_err(|e| e.to_string())?;
    serde_yaml::from_str(&text).map_err(|e| documents::strip_location(&e.to_string()))
}

/// The deny-all stand-in, named `name`, for a NetworkPolicy that cannot be enforced as written:
/// it isolates the pods the policy selects and allows nothing.
///
/// - When the policy's `spec` parses (`spec` is `Some`: only its metadata is wrong, or its name
///   missing), the stand-in keeps its `podSelector` and isolates in the directions it declares
///   (`policyTypes`, defaulted as the evaluator defaults it; both directions when `policyTypes`
///   holds an unknown type) — what the compiler and the evaluator do with a policy the API server
///   would reject.
/// - When even the spec does not parse, its declarations cannot be trusted: the stand-in isolates
///   both directions, and every pod of the namespace when `podSelector` is unreadable too.
fn fail_closed_policy(
    value: &serde_yaml::Value,
    name: String,
    spec: Option<&NetworkPolicySpec>,
    reason: &str,
) -> NetworkPolicy {
    let mut policy = NetworkPolicy::default();
    policy.metadata.name = Some(name);
    policy.metadata.namespace = value
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(|v| v.as_str())
        .map(Into::into);
    policy.metadata.annotations = Some(BTreeMap::from([(
        INVALID_ANNOTATION.to_owned(),
        reason.to_owned(),
    )]));
    let (selector, directions) = match spec {
        Some(spec) => (
            spec.pod_selector.clone().unwrap_or_default(),
            crate::evaluator::declared_types(spec),
        ),
        None => (
            value
                .get("spec")
                .and_then(|s| s.get("podSelector"))
                .and_then(|s| serde_yaml::from_value::<LabelSelector>(s.clone()).ok())
                .unwrap_or_default(),
            vec![Direction::Ingress, Direction::Egress],
        ),
    };
    policy.spec = Some(NetworkPolicySpec {
        pod_selector: Some(selector),
        policy_types: Some(
            directions
                .into_iter()
                .map(|d| match d {
                    Direction::Ingress => "Ingress".to_owned(),
                    Direction::Egress => "Egress".to_owned(),
                })
                .collect(),
        ),
        ..Default::default()
    });
    policy
}

/// Defaults the API server would apply.
fn normalize(mut object: Object) -> Object {
    let namespaced = object.kind().namespaced();
    let meta = match &mut object {
        Object::Namespace(o) => &mut o.metadata,
        Object::Pod(o) => &mut o.metadata,
        Object::Service(o) => &mut o.metadata,
        Object::NetworkPolicy(o) => &mut o.metadata,
        Object::Node(o) => &mut o.metadata,
        Object::EndpointSlice(o) => &mut o.metadata,
    };
    strip(meta);
    if namespaced {
        if meta.namespace.as_deref().unwrap_or("").is_empty() {
            meta.namespace = Some("default".into());
        }
    } else {
        meta.namespace = None;
    }
    if let Object::Namespace(ns) = &mut object {
        let name = ns.metadata.name.clone().unwrap_or_default();
        ns.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(NAMESPACE_NAME_LABEL.into(), name);
    }
    object
}

fn add_implicit_namespaces(objects: &mut BTreeMap<Kind, Vec<Object>>) {
    let defined: BTreeSet<String> = objects
        .get(&Kind::Namespace)
        .into_iter()
        .flatten()
        .map(|o| o.key().name)
        .collect();
    let referenced: BTreeSet<String> = objects
        .iter()
        .filter(|(kind, _)| kind.namespaced())
        .flat_map(|(_, list)| list.iter().map(|o| o.key().namespace))
        .filter(|ns| !defined.contains(ns))
        .collect();
    for name in referenced {
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name);
        objects
            .entry(Kind::Namespace)
            .or_default()
            .push(normalize(Object::from(ns)));
    }
}

/// Watches `dir` and sends an [`Update`] whenever `.revision` or any manifest changes. Runs until
/// the receiver is dropped.
pub async fn run(dir: PathBuf, poll: Duration, tx: mpsc::Sender<Update>) {
    let mut last: Option<Fingerprint> = None;
    let mut revision: u64 = 0;
    let scanner = std::sync::Arc::new(std::sync::Mutex::new(Scanner::default()));
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let dir2 = dir.clone();
        let result = tokio::task::spawn_blocking(move || {
            let fp = fingerprint(&dir2);
            (fp, dir2)
        })
        .await;
        let Ok((fp, dir2)) = result else { continue };
        if last.as_ref() == Some(&fp) {
            continue;
        }
        let scanner = scanner.clone();
        let Ok(scan) = tokio::task::spawn_blocking(move || {
            scanner
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .scan(&dir2)
        })
        .await
        else {
            continue;
        };
        revision = scan.revision.next(revision);
        for e in &scan.errors {
            warn!(error = %e, "manifest");
        }
        debug!(revision, dir = %dir.display(), "manifests changed");
        last = Some(fp);
        if tx.send(scan.into_update(revision)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_parse() {
        let mut errors = vec![];
        assert_eq!(
            parse_revision(Some("42\n"), &mut errors),
            RevisionFile::Valid(42)
        );
        assert_eq!(parse_revision(None, &mut errors), RevisionFile::Missing);
        assert_eq!(parse_revision(Some(""), &mut errors), RevisionFile::Invalid);
        assert!(errors.is_empty(), "a file caught mid-write is not an error");
        assert_eq!(
            parse_revision(Some("x"), &mut errors),
            RevisionFile::Invalid
        );
        assert_eq!(errors.len(), 1);
        assert_eq!(RevisionFile::Valid(7).next(3), 7);
        assert_eq!(RevisionFile::Missing.next(3), 4);
        assert_eq!(
            RevisionFile::Invalid.next(3),
            3,
            "never ahead of what was written"
        );
    }

    #[test]
    fn location_stripped() {
        assert_eq!(
            documents::strip_location("spec.x: invalid type at line 3 column 4"),
            "spec.x: invalid type"
        );
    }
}
