//! Label selectors, normalised: `matchLabels` and `matchExpressions` become one sorted list of
//! requirements, all of which must hold (`{}` selects everything).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::model::{Labels, meta};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    In,
    /// Also true when the key is absent.
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    /// Sorted, without duplicates; empty for `Exists` / `DoesNotExist`.
    pub values: Vec<String>,
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.binary_search(v).is_ok()),
            Operator::NotIn => value.is_none_or(|v| self.values.binary_search(v).is_err()),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// A normalised label selector. Two selectors that select the same label sets by construction
/// (same requirements in any order, `matchLabels` vs `In` with one value) compare equal, so
/// resolution results can be shared.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

/// Why a selector is invalid; `field` is relative to the selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectorError {
    pub field: String,
    pub reason: String,
}

impl Selector {
    /// The selector that matches everything (`{}`, or an absent selector where that means "all").
    pub fn everything() -> Self {
        Self::default()
    }

    /// Validates and normalises a selector the way the API server's validation does: label key
    /// and value syntax ([`meta::label_selector`]), known operators only, values required for
    /// `In`/`NotIn` and forbidden for `Exists`/`DoesNotExist`.
    pub fn parse(selector: &LabelSelector) -> Result<Self, SelectorError> {
        meta::label_selector(selector).map_err(|e| SelectorError {
            field: e.field,
            reason: e.problem.to_string(),
        })?;
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement {
                key: key.clone(),
                operator: Operator::In,
                values: vec![value.clone()],
            });
        }
        for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let err = |field: &str, reason: &str| SelectorError {
                field: format!("matchExpressions[{i}]{field}"),
                reason: reason.to_owned(),
            };
            if expr.key.is_empty() {
                return Err(err(".key", "must not be empty"));
            }
            let operator = match expr.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err(err(
                        ".operator",
                        &format!("unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"),
                    ));
                }
            };
            let mut values = expr.values.clone().unwrap_or_default();
            match operator {
                Operator::In | Operator::NotIn if values.is_empty() => {
                    return Err(err(
                        ".values",
                        "must be non-empty when the operator is In or NotIn",
                    ));
                }
                Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                    return Err(err(
                        ".values",
                        "must be empty when the operator is Exists or DoesNotExist",
                    ));
                }
                _ => {}
            }
            values.sort();
            values.dedup();
            requirements.push(Requirement {
                key: expr.key.clone(),
                operator,
                values,
            });
        }
        requirements.sort();
        requirements.dedup();
        Ok(Selector { requirements })
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// True for `{}`.
    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sel(v: serde_json::Value) -> Result<Selector, SelectorError> {
        Selector::parse(&serde_json::from_value(v).unwrap())
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn empty_selects_everything() {
        let s = sel(json!({})).unwrap();
        assert!(s.is_everything());
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let s = sel(json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["f", "b"]}]
        }))
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "f")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("tier", "f")])));
    }

    #[test]
    fn operators() {
        let one = |op: &str, values: Option<Vec<&str>>| {
            let mut e = json!({"key": "k", "operator": op});
            if let Some(v) = values {
                e["values"] = json!(v);
            }
            sel(json!({"matchExpressions": [e]})).unwrap()
        };
        let none = labels(&[]);
        let a = labels(&[("k", "a")]);
        let b = labels(&[("k", "b")]);
        let s = one("In", Some(vec!["a"]));
        assert!(s.matches(&a) && !s.matches(&b) && !s.matches(&none));
        // NotIn holds when the key is absent.
        let s = one("NotIn", Some(vec!["a"]));
        assert!(!s.matches(&a) && s.matches(&b) && s.matches(&none));
        let s = one("Exists", None);
        assert!(s.matches(&a) && s.matches(&b) && !s.matches(&none));
        let s = one("DoesNotExist", None);
        assert!(!s.matches(&a) && !s.matches(&b) && s.matches(&none));
    }

    #[test]
    fn equivalent_selectors_normalise_equal() {
        let a = sel(json!({"matchLabels": {"x": "1", "y": "2"}})).unwrap();
        let b = sel(json!({"matchExpressions": [
            {"key": "y", "operator": "In", "values": ["2"]},
            {"key": "x", "operator": "In", "values": ["1", "1"]}
        ]}))
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn invalid_selectors_name_the_field() {
        let e = sel(json!({"matchExpressions": [
            {"key": "k", "operator": "Exists"},
            {"key": "k", "operator": "Near", "values": ["a"]}
        ]}))
        .unwrap_err();
        assert_eq!(e.field, "matchExpressions[1].operator");
        let e = sel(json!({"matchExpressions": [{"key": "k", "operator": "In", "values": []}]}))
            .unwrap_err();
        assert_eq!(e.field, "matchExpressions[0].values");
        let e = sel(json!({"matchExpressions": [{"key": "k", "operator": "NotIn"}]})).unwrap_err();
        assert_eq!(e.field, "matchExpressions[0].values");
        let e =
            sel(json!({"matchExpressions": [{"key": "k", "operator": "Exists", "values": ["a"]}]}))
                .unwrap_err();
        assert_eq!(e.field, "matchExpressions[0].values");
        let e = sel(json!({"matchExpressions": [{"key": "", "operator": "Exists"}]})).unwrap_err();
        assert_eq!(e.field, "matchExpressions[0].key");
        let e = sel(json!({"matchLabels": {"pod": "b".repeat(64)}})).unwrap_err();
        assert_eq!(e.field, "matchLabels[\"pod\"]");
        assert!(e.reason.contains("longer than 63"), "{}", e.reason);
        let e =
            sel(json!({"matchExpressions": [{"key": "k", "operator": "NotIn", "values": ["-x"]}]}))
                .unwrap_err();
        assert_eq!(e.field, "matchExpressions[0].values[0]");
    }
}
