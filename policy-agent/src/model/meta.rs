//! Label and annotation syntax, checked as the API server checks it
//! (`k8s.io/apimachinery/pkg/util/validation` and `.../api/validation`), in one place for every
//! reader: the manifest source (object metadata of every kind), the compiler and the reference
//! evaluator (label selectors of NetworkPolicies).
//!
//! - A label key or annotation key is a *qualified name*: an optional prefix, a DNS subdomain of
//!   at most 253 characters, and `/`, then a name of 1–63 characters of `[A-Za-z0-9._-]` starting
//!   and ending alphanumeric. Annotation keys are checked lowercased (the API server does so).
//! - A label value is empty, or 1–63 characters of the same set, starting and ending
//!   alphanumeric.
//! - The annotations of one object take at most 256 KiB (keys plus values).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

/// Longest name part of a qualified name, and longest label value.
pub const MAX_NAME_LENGTH: usize = 63;
/// Longest prefix of a qualified name (a DNS subdomain).
pub const MAX_PREFIX_LENGTH: usize = 253;
/// Most bytes the annotations of one object may take, keys and values together.
pub const MAX_ANNOTATIONS_SIZE: usize = 256 * 1024;

/// What is wrong with one key, value or map.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxError {
    #[error("key name must not be empty")]
    EmptyName,
    #[error("key prefix before '/' must not be empty")]
    EmptyPrefix,
    #[error("key has more than one '/'")]
    TooManySlashes,
    #[error("key prefix longer than {MAX_PREFIX_LENGTH} characters")]
    PrefixTooLong,
    #[error(
        "key prefix {prefix:?} is not a DNS subdomain (lowercase alphanumerics, '-' and '.', \
         each part starting and ending alphanumeric)"
    )]
    PrefixNotSubdomain { prefix: String },
    #[error("key name longer than {MAX_NAME_LENGTH} characters")]
    NameTooLong,
    #[error(
        "key name {name:?} must consist of alphanumerics, '-', '_' or '.', starting and ending \
         alphanumeric"
    )]
    NameCharacters { name: String },
    #[error("value longer than {MAX_NAME_LENGTH} characters")]
    ValueTooLong,
    #[error(
        "value {value:?} must be empty or consist of alphanumerics, '-', '_' or '.', starting \
         and ending alphanumeric"
    )]
    ValueCharacters { value: String },
    #[error("total size {size} bytes is more than the limit of {MAX_ANNOTATIONS_SIZE} bytes")]
    AnnotationsTooLarge { size: usize },
}

/// A [`SyntaxError`] at a field path, e.g. `metadata.labels["team"]: value longer than 63
/// characters`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    pub field: String,
    pub problem: SyntaxError,
}

impl FieldError {
    fn new(field: String, problem: SyntaxError) -> Self {
        Self { field, problem }
    }
}

/// `[A-Za-z0-9._-]+`, starting and ending alphanumeric.
fn is_name_like(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A DNS-1123 subdomain (without the length limit): `.`-separated labels of `[a-z0-9-]`, each
/// starting and ending alphanumeric.
fn is_subdomain(s: &str) -> bool {
    s.split('.').all(|label| {
        let b = label.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    })
}

/// Checks a label key (or an annotation key, lowercased by the caller).
pub fn qualified_name(key: &str) -> Result<(), SyntaxError> {
    let name = match key.split_once('/') {
        None => key,
        Some((_, rest)) if rest.contains('/') => return Err(SyntaxError::TooManySlashes),
        Some((prefix, name)) => {
            if prefix.is_empty() {
                return Err(SyntaxError::EmptyPrefix);
            }
            if prefix.len() > MAX_PREFIX_LENGTH {
                return Err(SyntaxError::PrefixTooLong);
            }
            if !is_subdomain(prefix) {
                return Err(SyntaxError::PrefixNotSubdomain {
                    prefix: prefix.to_owned(),
                });
            }
            name
        }
    };
    if name.is_empty() {
        return Err(SyntaxError::EmptyName);
    }
    if name.len() > MAX_NAME_LENGTH {
        return Err(SyntaxError::NameTooLong);
    }
    if !is_name_like(name) {
        return Err(SyntaxError::NameCharacters {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Checks a label value.
pub fn label_value(value: &str) -> Result<(), SyntaxError> {
    if value.is_empty() {
        return Ok(());
    }
    if value.len() > MAX_NAME_LENGTH {
        return Err(SyntaxError::ValueTooLong);
    }
    if !is_name_like(value) {
        return Err(SyntaxError::ValueCharacters {
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// `field["key"]`, the key shortened when it is long (it may be the very problem).
fn entry(field: &str, key: &str) -> String {
    const SHOWN: usize = 80;
    if key.len() <= SHOWN {
        return format!("{field}[{key:?}]");
    }
    let mut end = SHOWN;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{field}[{:?}…]", &key[..end])
}

/// Every problem of a label map at `field` (e.g. `metadata.labels`), in key order.
pub fn labels(field: &str, labels: &BTreeMap<String, String>) -> Vec<FieldError> {
    labels
        .iter()
        .filter_map(|(k, v)| {
            qualified_name(k)
                .and_then(|()| label_value(v))
                .err()
                .map(|p| FieldError::new(entry(field, k), p))
        })
        .collect()
}

/// Every problem of an annotation map at `field` (e.g. `metadata.annotations`): keys in key
/// order, then the total size.
pub fn annotations(field: &str, annotations: &BTreeMap<String, String>) -> Vec<FieldError> {
    let mut out: Vec<FieldError> = annotations
        .keys()
        .filter_map(|k| {
            qualified_name(&k.to_ascii_lowercase())
                .err()
                .map(|p| FieldError::new(entry(field, k), p))
        })
        .collect();
    let size: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_ANNOTATIONS_SIZE {
        out.push(FieldError::new(
            field.to_owned(),
            SyntaxError::AnnotationsTooLarge { size },
        ));
    }
    out
}

/// Every label and annotation problem of an object's metadata, with `metadata.`-rooted fields.
pub fn object_meta(meta: &ObjectMeta) -> Vec<FieldError> {
    let mut out = Vec::new();
    if let Some(l) = &meta.labels {
        out.extend(labels("metadata.labels", l));
    }
    if let Some(a) = &meta.annotations {
        out.extend(annotations("metadata.annotations", a));
    }
    out
}

/// The first key or value syntax problem of a label selector, with a field relative to the
/// selector (`matchLabels["app"]`, `matchExpressions[0].key`, `matchExpressions[0].values[1]`).
/// Operators and the presence of values are the selector reader's business.
pub fn label_selector(selector: &LabelSelector) -> Result<(), FieldError> {
    if let Some(e) = selector
        .match_labels
        .as_ref()
        .and_then(|l| labels("matchLabels", l).into_iter().next())
    {
        return Err(e);
    }
    for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
        qualified_name(&expr.key)
            .map_err(|p| FieldError::new(format!("matchExpressions[{i}].key"), p))?;
        for (j, value) in expr.values.iter().flatten().enumerate() {
            label_value(value)
                .map_err(|p| FieldError::new(format!("matchExpressions[{i}].values[{j}]"), p))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualified_names() {
        for ok in [
            "app",
            "a",
            "A.b_c-9",
            "kubernetes.io/metadata.name",
            "x.y-z.example/Name",
            &"n".repeat(63),
            &format!("{}/n", "p".repeat(253)),
        ] {
            assert_eq!(qualified_name(ok), Ok(()), "{ok:?}");
        }
        let cases = [
            ("", SyntaxError::EmptyName),
            ("p/", SyntaxError::EmptyName),
            ("/n", SyntaxError::EmptyPrefix),
            ("a/b/c", SyntaxError::TooManySlashes),
            (&"n".repeat(64), SyntaxError::NameTooLong),
            (
                &format!("{}/n", "p".repeat(254)),
                SyntaxError::PrefixTooLong,
            ),
            (
                "Example.com/n",
                SyntaxError::PrefixNotSubdomain {
                    prefix: "Example.com".into(),
                },
            ),
            (
                "a..b/n",
                SyntaxError::PrefixNotSubdomain {
                    prefix: "a..b".into(),
                },
            ),
            (
                "-app",
                SyntaxError::NameCharacters {
                    name: "-app".into(),
                },
            ),
            (
                "app.",
                SyntaxError::NameCharacters {
                    name: "app.".into(),
                },
            ),
            ("a b", SyntaxError::NameCharacters { name: "a b".into() }),
        ];
        for (key, problem) in cases {
            assert_eq!(qualified_name(key), Err(problem), "{key:?}");
        }
    }

    #[test]
    fn label_values() {
        for ok in ["", "a", "web-1", "v1.2_3", &"v".repeat(63)] {
            assert_eq!(label_value(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(label_value(&"v".repeat(64)), Err(SyntaxError::ValueTooLong));
        for bad in ["-a", "a-", "a/b", "é", "a b"] {
            assert_eq!(
                label_value(bad),
                Err(SyntaxError::ValueCharacters { value: bad.into() })
            );
        }
    }

    #[test]
    fn errors_name_the_field() {
        let l = BTreeMap::from([
            ("x".to_owned(), "v".repeat(100)),
            ("ok".to_owned(), "fine".to_owned()),
        ]);
        let errors = labels("metadata.labels", &l);
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            "metadata.labels[\"x\"]: value longer than 63 characters"
        );
        let long = "k".repeat(1000);
        let e = &labels("metadata.labels", &BTreeMap::from([(long, String::new())]))[0];
        assert!(e.field.len() < 120, "long keys are shortened: {}", e.field);
        assert_eq!(e.problem, SyntaxError::NameTooLong);
    }

    #[test]
    fn annotation_keys_and_size() {
        // Keys are checked lowercased: an upper-case prefix is accepted, a bad name is not.
        let a = BTreeMap::from([
            (
                "Example.COM/Key".to_owned(),
                "any value at all: /?".to_owned(),
            ),
            ("bad key".to_owned(), String::new()),
        ]);
        let errors = annotations("metadata.annotations", &a);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "metadata.annotations[\"bad key\"]");
        let big = BTreeMap::from([("k".to_owned(), "v".repeat(MAX_ANNOTATIONS_SIZE))]);
        let errors = annotations("metadata.annotations", &big);
        assert_eq!(
            errors,
            vec![FieldError {
                field: "metadata.annotations".into(),
                problem: SyntaxError::AnnotationsTooLarge {
                    size: MAX_ANNOTATIONS_SIZE + 1
                },
            }]
        );
        let fits = BTreeMap::from([("k".to_owned(), "v".repeat(MAX_ANNOTATIONS_SIZE - 1))]);
        assert!(annotations("metadata.annotations", &fits).is_empty());
    }

    #[test]
    fn selectors() {
        let sel = |v: serde_json::Value| -> LabelSelector { serde_json::from_value(v).unwrap() };
        assert_eq!(
            label_selector(&sel(serde_json::json!({
                "matchLabels": {"app": "web"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]
            }))),
            Ok(())
        );
        let e = label_selector(&sel(
            serde_json::json!({"matchLabels": {"app": "x".repeat(64)}}),
        ))
        .unwrap_err();
        assert_eq!(e.field, "matchLabels[\"app\"]");
        let e = label_selector(&sel(serde_json::json!({
            "matchExpressions": [
                {"key": "ok", "operator": "Exists"},
                {"key": "k", "operator": "In", "values": ["a", "not valid"]}
            ]
        })))
        .unwrap_err();
        assert_eq!(e.field, "matchExpressions[1].values[1]");
        let e = label_selector(&sel(serde_json::json!({
            "matchExpressions": [{"key": "a/b/c", "operator": "Exists"}]
        })))
        .unwrap_err();
        assert_eq!(e.field, "matchExpressions[0].key");
        assert_eq!(e.problem, SyntaxError::TooManySlashes);
    }
}
