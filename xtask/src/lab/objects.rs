//! Reading Kubernetes objects from YAML/JSON files the way `kubectl apply -f` does: files or
//! directories (`.yaml`, `.yml`, `.json`, not recursive), multi-document YAML, `kind: List`, `-` for
//! stdin. Only Namespace, Pod, Service and NetworkPolicy are understood. Parsing is strict: unknown
//! fields are errors (kubectl's default field validation), and every object is validated like the API
//! server would before anything is applied.

use std::{
    fmt,
    io::Read,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    networking::v1::NetworkPolicy,
};
use serde_json::Value;

use super::validate;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    NetworkPolicy,
}

impl Kind {
    pub fn parse(kind: &str, api_version: &str) -> Option<Self> {
        match (kind, api_version) {
            ("Namespace", "v1") => Some(Kind::Namespace),
            ("Pod", "v1") => Some(Kind::Pod),
            ("Service", "v1") => Some(Kind::Service),
            ("NetworkPolicy", "networking.k8s.io/v1") => Some(Kind::NetworkPolicy),
            _ => None,
        }
    }
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Namespace => "namespace",
            Kind::Pod => "pod",
            Kind::Service => "service",
            Kind::NetworkPolicy => "networkpolicy",
        }
    }
    pub fn namespaced(self) -> bool {
        self != Kind::Namespace
    }
}

/// Which object: kind, namespace (empty for Namespaces) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjRef {
    /// `ns/name` for namespaced objects, `name` for namespaces.
    pub fn key(&self) -> String {
        if self.kind.namespaced() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            self.name.clone()
        }
    }
}

impl fmt::Display for ObjRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind.resource(), self.key())
    }
}

#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    Service(Box<Service>),
    NetworkPolicy(Box<NetworkPolicy>),
}

impl Object {
    /// The object as JSON, `apiVersion` and `kind` included.
    pub fn as_value(&self) -> serde_json::Result<Value> {
        match self {
            Object::Namespace(o) => serde_json::to_value(o),
            Object::Pod(o) => serde_json::to_value(o),
            Object::Service(o) => serde_json::to_value(o),
            Object::NetworkPolicy(o) => serde_json::to_value(o),
        }
    }

    pub fn obj_ref(&self) -> ObjRef {
        let (kind, meta) = match self {
            Object::Namespace(o) => (Kind::Namespace, &o.metadata),
            Object::Pod(o) => (Kind::Pod, &o.metadata),
            Object::Service(o) => (Kind::Service, &o.metadata),
            Object::NetworkPolicy(o) => (Kind::NetworkPolicy, &o.metadata),
        };
        ObjRef {
            kind,
            namespace: if kind.namespaced() {
                meta.namespace.clone().unwrap_or_default()
            } else {
                String::new()
            },
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// One document read from a file.
#[derive(Clone, Debug)]
pub struct Doc {
    /// `FILE` or `FILE (document N)` for error messages.
    pub source: String,
    pub value: Value,
}

/// An object with where it came from.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub source: String,
    pub object: Object,
}

/// Reads every document of every path, in order.
pub fn read_docs(paths: &[PathBuf]) -> Result<Vec<Doc>> {
    let mut docs = Vec::new();
    for path in paths {
        for file in expand(path)? {
            let (name, text) = if file == Path::new("-") {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("reading stdin")?;
                ("<stdin>".to_string(), s)
            } else {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                (file.display().to_string(), text)
            };
            docs.extend(parse_text(&name, &text)?);
        }
    }
    Ok(docs)
}

fn expand(path: &Path) -> Result<Vec<PathBuf>> {
    if path == Path::new("-") {
        return Ok(vec![path.to_path_buf()]);
    }
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading directory {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no .yaml, .yml or .json files", path.display());
    }
    Ok(files)
}

/// Splits a multi-document YAML (or JSON) text into documents; `kind: List` is flattened.
pub fn parse_text(name: &str, text: &str) -> Result<Vec<Doc>> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let source = format!("{name} (document {})", i + 1);
        let yaml: serde_yaml::Value = serde::Deserialize::deserialize(de)
            .with_context(|| format!("{source}: invalid YAML"))?;
        if yaml.is_null() {
            continue;
        }
        let value: Value = serde_json::to_value(&yaml)
            .with_context(|| format!("{source}: not representable as JSON"))?;
        if value.get("kind").and_then(Value::as_str) == Some("List") {
            let items = value
                .get("items")
                .and_then(Value::as_array)
                .with_context(|| format!("{source}: kind List without items"))?;
            for (j, item) in items.iter().enumerate() {
                docs.push(Doc {
                    source: format!("{source} item {j}"),
                    value: item.clone(),
                });
            }
        } else {
            docs.push(Doc { source, value });
        }
    }
    Ok(docs)
}

/// Kind, namespace and name of a document without parsing the rest (enough for `delete`).
pub fn doc_ref(doc: &Doc) -> Result<ObjRef> {
    let v = &doc.value;
    let kind_s = v.get("kind").and_then(Value::as_str).unwrap_or("");
    let api = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let Some(kind) = Kind::parse(kind_s, api) else {
        if kind_s.is_empty() {
            bail!("{}: missing field `kind`", doc.source);
        }
        bail!(
            "{}: unsupported kind {kind_s:?} (apiVersion {api:?}); the lab understands v1 Namespace, Pod, Service and networking.k8s.io/v1 NetworkPolicy",
            doc.source
        );
    };
    let meta = v.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if name.is_empty() {
        bail!(
            "{}: {}: metadata.name: Required value",
            doc.source,
            kind.resource()
        );
    }
    let namespace = if kind.namespaced() {
        meta.and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
            .to_string()
    } else {
        String::new()
    };
    Ok(ObjRef {
        kind,
        namespace,
        name: name.to_string(),
    })
}

/// Parses and validates one document. Errors name the file, the object and the field.
pub fn parse_doc(doc: &Doc) -> Result<Loaded> {
    let r = doc_ref(doc)?;
    let mut value = doc.value.clone();
    if let Some(obj) = value.as_object_mut() {
        // Status is the kubelet's / controllers' business; apply ignores it, as the API server does.
        obj.remove("status");
        if r.kind.namespaced() {
            let meta = obj
                .entry("metadata")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(m) = meta.as_object_mut() {
                m.insert("namespace".into(), Value::String(r.namespace.clone()));
            }
        }
    }
    let fail = |msg: String| anyhow::anyhow!("{}: {r}: {msg}", doc.source);
    let object = match r.kind {
        Kind::Namespace => Object::Namespace(Box::new(typed(&value).map_err(fail)?)),
        Kind::Pod => Object::Pod(Box::new(typed(&value).map_err(fail)?)),
        Kind::Service => Object::Service(Box::new(typed(&value).map_err(fail)?)),
        Kind::NetworkPolicy => Object::NetworkPolicy(Box::new(typed(&value).map_err(fail)?)),
    };
    let errors = validate::object(&object);
    if !errors.is_empty() {
        bail!("{}: {r} is invalid:\n  {}", doc.source, errors.join("\n  "));
    }
    Ok(Loaded {
        source: doc.source.clone(),
        object,
    })
}

/// Deserializes into a k8s-openapi type, rejecting fields the type does not know.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(
    value: &Value,
) -> std::result::Result<T, String> {
    let t: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&t).map_err(|e| e.to_string())?;
    let mut unknown = Vec::new();
    unknown_fields(value, &back, "", &mut unknown);
    if let Some(first) = unknown.first() {
        return Err(format!(
            "{first}: unknown field{}",
            if unknown.len() > 1 {
                format!(" (and {})", unknown[1..].join(", "))
            } else {
                String::new()
            }
        ));
    }
    Ok(t)
}

/// Paths present (and non-null) in `input` but dropped by a typed round trip.
fn unknown_fields(input: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (input, back) {
        (Value::Object(i), Value::Object(b)) => {
            for (k, v) in i {
                if v.is_null() || (path.is_empty() && (k == "apiVersion" || k == "kind")) {
                    continue;
                }
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get(k) {
                    Some(bv) => unknown_fields(v, bv, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(i), Value::Array(b)) => {
            for (n, (iv, bv)) in i.iter().zip(b).enumerate() {
                unknown_fields(iv, bv, &format!("{path}[{n}]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Vec<Loaded>> {
        parse_text("t.yaml", yaml)?.iter().map(parse_doc).collect()
    }

    #[test]
    fn multi_document_and_defaults() {
        let l = parse(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers: [{name: c, ports: [{containerPort: 80}]}]\n",
        )
        .unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].object.obj_ref().to_string(), "pod/default/a");
    }

    #[test]
    fn unknown_field_is_named() {
        let e = parse(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    - podSelektor: {}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("t.yaml (document 1)"), "{e}");
        assert!(e.contains("networkpolicy/x/p"), "{e}");
        assert!(e.contains("spec.ingress[0].from[0].podSelektor"), "{e}");
    }

    #[test]
    fn unknown_kind_is_rejected() {
        let e = parse("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unsupported kind \"Deployment\""), "{e}");
    }

    #[test]
    fn null_values_and_status_are_accepted() {
        parse("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n  creationTimestamp: null\n  labels:\nstatus: {phase: Active}\n").unwrap();
    }

    #[test]
    fn list_is_flattened() {
        let docs = parse_text(
            "l.json",
            r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"a"}},{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"b"}}]}"#,
        )
        .unwrap();
        assert_eq!(docs.len(), 2);
    }
}
