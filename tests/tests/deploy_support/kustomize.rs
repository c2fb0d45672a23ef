//! The part of kustomize the deploy/ overlays use, so that the rendered objects can be checked without a kustomize
//! binary: `resources` (files and directories), `patches` (strategic-merge patch files) and `images`.
//! Anything else in a kustomization.yaml is an error naming the key, so an overlay cannot silently use a feature
//! this renderer ignores. When kubectl is present, deploy_manifests.rs checks that `kubectl kustomize` renders the
//! same objects.

use std::path::Path;

use serde_json::{Map, Value};

use super::{object_ref, read, yaml_documents};

const SUPPORTED_KEYS: &[&str] = &["apiVersion", "kind", "resources", "patches", "images"];

/// Renders the kustomization in `dir` into its objects.
pub fn build(dir: &Path) -> Result<Vec<Value>, String> {
    let file = dir.join("kustomization.yaml");
    let docs = yaml_documents(&read(&file), &file)?;
    let [kustomization] = docs.as_slice() else {
        return Err(format!("{}: expected one document", file.display()));
    };
    let fields = kustomization
        .as_object()
        .ok_or_else(|| format!("{}: not a mapping", file.display()))?;
    for key in fields.keys() {
        if !SUPPORTED_KEYS.contains(&key.as_str()) {
            return Err(format!(
                "{}: kustomization key {key:?} is not supported by the test renderer \
                 (tests/tests/deploy_support/kustomize.rs)",
                file.display()
            ));
        }
    }
    if kustomization["apiVersion"] != "kustomize.config.k8s.io/v1beta1"
        || kustomization["kind"] != "Kustomization"
    {
        return Err(format!(
            "{}: expected apiVersion kustomize.config.k8s.io/v1beta1, kind Kustomization",
            file.display()
        ));
    }

    let mut objects = Vec::new();
    for resource in string_list(kustomization, "resources", &file)? {
        let path = dir.join(&resource);
        if path.is_dir() {
            objects.extend(build(&path)?);
        } else if path.is_file() {
            objects.extend(yaml_documents(&read(&path), &path)?);
        } else {
            return Err(format!(
                "{}: resource {resource} does not exist",
                file.display()
            ));
        }
    }

    for patch in list(kustomization, "patches", &file)? {
        let entry = patch
            .as_object()
            .ok_or_else(|| format!("{}: a patch is not a mapping", file.display()))?;
        if entry.keys().any(|k| k != "path") {
            return Err(format!(
                "{}: only `patches: - path: FILE` (strategic merge, target taken from the file) is supported",
                file.display()
            ));
        }
        let path = dir.join(
            entry["path"]
                .as_str()
                .ok_or_else(|| format!("{}: patch path is not a string", file.display()))?,
        );
        let patches = yaml_documents(&read(&path), &path)?;
        for patch in &patches {
            apply_patch(&mut objects, patch).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }

    for image in list(kustomization, "images", &file)? {
        set_image(&mut objects, image).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    Ok(objects)
}

fn list<'a>(kustomization: &'a Value, key: &str, file: &Path) -> Result<&'a [Value], String> {
    match &kustomization[key] {
        Value::Null => Ok(&[]),
        Value::Array(items) => Ok(items),
        _ => Err(format!("{}: {key} is not a list", file.display())),
    }
}

fn string_list(kustomization: &Value, key: &str, file: &Path) -> Result<Vec<String>, String> {
    list(kustomization, key, file)?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("{}: {key} holds a non-string", file.display()))
        })
        .collect()
}

/// Applies a strategic-merge patch to the one object with the same apiVersion, kind, name and namespace.
fn apply_patch(objects: &mut [Value], patch: &Value) -> Result<(), String> {
    let same_target = |o: &&mut Value| {
        o["apiVersion"] == patch["apiVersion"]
            && o["kind"] == patch["kind"]
            && o["metadata"]["name"] == patch["metadata"]["name"]
            && o["metadata"]["namespace"] == patch["metadata"]["namespace"]
    };
    let mut targets: Vec<&mut Value> = objects.iter_mut().filter(same_target).collect();
    match targets.as_mut_slice() {
        [target] => strategic_merge(target, patch, ""),
        [] => Err(format!("patch {} matches no object", object_ref(patch))),
        _ => Err(format!(
            "patch {} matches several objects",
            object_ref(patch)
        )),
    }
}

/// The list fields a patch may merge into, with their merge keys (`patchMergeKey` in k8s.io/api core/v1
/// types.go). Any other list is replaced whole, as the API's strategic merge does for lists without a key.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers" | "initContainers" | "env" | "volumes" | "imagePullSecrets" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "ports" => Some("containerPort"),
        _ => None,
    }
}

fn strategic_merge(base: &mut Value, patch: &Value, path: &str) -> Result<(), String> {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (key, value) in patch {
                if key.starts_with('$') {
                    return Err(format!("{path}/{key}: patch directives are not supported"));
                }
                let here = format!("{path}/{key}");
                if value.is_null() {
                    base.remove(key);
                    continue;
                }
                match (base.get_mut(key), value, merge_key(key)) {
                    (Some(existing), Value::Array(items), Some(merge_key)) => {
                        merge_keyed_list(existing, items, merge_key, &here)?
                    }
                    (Some(existing @ Value::Object(_)), Value::Object(_), _) => {
                        strategic_merge(existing, value, &here)?
                    }
                    _ => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
            Ok(())
        }
        (base, patch) => {
            *base = patch.clone();
            Ok(())
        }
    }
}

fn merge_keyed_list(
    base: &mut Value,
    items: &[Value],
    key: &str,
    path: &str,
) -> Result<(), String> {
    let Value::Array(existing) = base else {
        return Err(format!("{path}: patching a list onto a non-list"));
    };
    // kustomize puts the patch's items first, in patch order (merged into the existing item of
    // the same key, if any), then the existing items the patch does not name.
    let mut merged = Vec::new();
    for item in items {
        let id = item
            .get(key)
            .ok_or_else(|| format!("{path}: patch item without merge key {key}"))?;
        match existing.iter().position(|e| e.get(key) == Some(id)) {
            Some(i) => {
                let mut target = existing.remove(i);
                strategic_merge(&mut target, item, &format!("{path}[{key}={id}]"))?;
                merged.push(target);
            }
            None => merged.push(item.clone()),
        }
    }
    existing.splice(0..0, merged);
    Ok(())
}

/// kustomize's `images` transformer on pod templates: `name` matches the image without tag or digest.
fn set_image(objects: &mut [Value], image: &Value) -> Result<(), String> {
    let fields = image
        .as_object()
        .ok_or_else(|| "an images entry is not a mapping".to_owned())?;
    for key in fields.keys() {
        if !["name", "newName", "newTag"].contains(&key.as_str()) {
            return Err(format!(
                "images: {key:?} is not supported by the test renderer"
            ));
        }
    }
    let name = image["name"]
        .as_str()
        .ok_or_else(|| "images: entry without name".to_owned())?;
    for object in objects {
        for list in ["containers", "initContainers"] {
            if let Some(Value::Array(containers)) =
                object.pointer_mut(&format!("/spec/template/spec/{list}"))
            {
                for container in containers {
                    rewrite_image(container, name, fields)?;
                }
            }
        }
    }
    Ok(())
}

fn rewrite_image(
    container: &mut Value,
    name: &str,
    fields: &Map<String, Value>,
) -> Result<(), String> {
    let Some(current) = container["image"].as_str() else {
        return Ok(());
    };
    let (current_name, current_tag) = match current.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, Some(t)),
        _ => (current, None),
    };
    if current_name != name {
        return Ok(());
    }
    let new_name = fields
        .get("newName")
        .and_then(Value::as_str)
        .unwrap_or(current_name);
    let new_tag = fields.get("newTag").and_then(Value::as_str).or(current_tag);
    let rewritten = match new_tag {
        Some(tag) => format!("{new_name}:{tag}"),
        None => new_name.to_owned(),
    };
    container["image"] = Value::String(rewritten);
    Ok(())
}
