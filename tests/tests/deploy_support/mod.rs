//! Helpers shared by the `deploy_*` tests, which check everything under `deploy/` (and the Dockerfile and the kind
//! e2e workflow) offline: no cluster, no container engine. Each test crate uses a part of them.
#![allow(dead_code)]

pub mod agent;
pub mod kubectl;
pub mod kustomize;
pub mod typed;

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde_json::Value;

/// The repository root (the workspace holding this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A path relative to the repository root.
pub fn repo_path(relative: &str) -> PathBuf {
    repo_root().join(relative)
}

/// Reads a file of the repository, naming it in the panic if it cannot.
pub fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Parses every non-empty document of a multi-document YAML text into JSON values (the shape the Kubernetes API
/// and kustomize work on).
pub fn yaml_documents(text: &str, origin: &Path) -> Result<Vec<Value>, String> {
    use serde::Deserialize;
    let mut documents = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(document)
            .map_err(|e| format!("{} document {index}: {e}", origin.display()))?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

/// Reads and parses a YAML file of the repository (panics with the file named if it is not valid YAML).
pub fn yaml_file(path: &Path) -> Vec<Value> {
    yaml_documents(&read(path), path).unwrap_or_else(|e| panic!("{e}"))
}

/// Where two JSON values differ, as JSON-pointer paths with both sides (empty when equal).
pub fn json_differences(expected: &Value, actual: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff_at("", expected, actual, &mut out);
    out
}

fn diff_at(path: &str, expected: &Value, actual: &Value, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (key, ev) in e {
                let here = format!("{path}/{key}");
                match a.get(key) {
                    Some(av) => diff_at(&here, ev, av, out),
                    None => out.push(format!("{here}: {ev} is missing on the other side")),
                }
            }
            for (key, av) in a {
                if !e.contains_key(key) {
                    out.push(format!("{path}/{key}: {av} appears only on the other side"));
                }
            }
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => {
            for (index, (ev, av)) in e.iter().zip(a).enumerate() {
                diff_at(&format!("{path}/{index}"), ev, av, out);
            }
        }
        _ if expected == actual => {}
        _ => out.push(format!("{path}: {expected} != {actual}")),
    }
}

/// `kind/namespace/name` of an object, for messages and lookups.
pub fn object_ref(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or("?");
    let name = object["metadata"]["name"].as_str().unwrap_or("?");
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind}/{ns}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

/// The overlays users install, and the base they share.
pub const KUSTOMIZATIONS: &[&str] = &["deploy/base", "deploy/overlays/kind", "deploy/overlays/k3s"];

/// The overlays users install.
pub const OVERLAYS: &[&str] = &["deploy/overlays/kind", "deploy/overlays/k3s"];

/// Renders a kustomization directory of the repository with the test's own kustomize (see [`kustomize`]).
pub fn render(dir: &str) -> Vec<Value> {
    kustomize::build(&repo_path(dir)).unwrap_or_else(|e| panic!("rendering {dir}: {e}"))
}

/// The single object of `kind` in a rendered set.
pub fn only<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind}, found {}",
        found.len()
    );
    found[0]
}
