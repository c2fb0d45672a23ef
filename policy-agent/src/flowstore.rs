//! The agent's record of recent flows: the last `--flow-records` verdict events of this node,
//! described ([`crate::flowlog::describe`]) and, while a policy is in audit, with what enforcing
//! it would change. `GET /flows` reads it back (on the control socket; on the TCP port too with
//! `--http-flows`), and so do `policy-agent control flows` and `kubectl netpol flows`.
//!
//! Memory is bounded by the record count: a full store holds exactly `capacity` records, the
//! oldest dropped first. A [`FlowRecord`] is 360 bytes plus its strings: about 650 bytes with
//! names of usual length (the default 4096 records: about 2.6 MiB); names at the Kubernetes
//! maximum (63-character namespaces, 253-character names) add at most about 1.9 KiB (4096
//! records: under 10 MiB), an audit note naming several policies more.
//!
//! What it sees is what the kernel reports: one event per new allowed flow and one per dropped
//! packet, within the per-CPU rate limit (CONFIG.events_per_sec); established packets report
//! nothing, so the fast path pays only at the first packet of a flow.

use std::{
    collections::VecDeque,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::flowlog::Flow;

/// The default of `--flow-records`.
pub const DEFAULT_CAPACITY: usize = 4096;

/// One recorded flow, as `/flows` returns it (one JSON object per line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// When the agent read the event, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The node whose agent recorded it.
    pub node: String,
    #[serde(flatten)]
    pub flow: Flow,
    /// Set while a policy is in audit and enforcing it would change this flow's verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditNote>,
}

/// What enforcing the audited policies would do to a recorded flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditNote {
    /// `would-drop` or `would-allow`.
    pub verdict: String,
    /// The audited policies, `ns/name`, comma-separated.
    pub policy: String,
    /// The audited rule that would allow it (`ingress[i]` / `egress[i]`; empty for would-drop).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rule: String,
}

/// Which records `/flows` returns; every field is optional and they combine with "and". The
/// same fields are the flags of `policy-agent control flows` and `kubectl netpol flows`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
pub struct FlowQuery {
    /// The local pod or the peer is in this namespace.
    #[arg(long, short = 'n')]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The local pod or the peer is this pod: NS/NAME, or NAME (in --namespace when given, in
    /// any namespace otherwise).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// allowed, dropped, would-drop or would-allow (the last two: the audit verdict).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// Only records of the last DURATION (90s, 5m, 1h30m, 250ms; a bare number is seconds), by
    /// the agent's clock.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// At most this many records, the newest.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// A query that cannot be answered, naming its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("flows query field {field}: {value:?}: {why}")]
    Field {
        field: &'static str,
        value: String,
        why: &'static str,
    },
}

const VERDICTS: [&str; 4] = ["allowed", "dropped", "would-drop", "would-allow"];

impl FlowQuery {
    /// Checks every field; what [`FlowStore::query`] runs first.
    pub fn validate(&self) -> Result<Option<Duration>, QueryError> {
        if let Some(v) = &self.verdict
            && !VERDICTS.contains(&v.as_str())
        {
            return Err(QueryError::Field {
                field: "verdict",
                value: v.clone(),
                why: "expected allowed, dropped, would-drop or would-allow",
            });
        }
        if let Some(p) = &self.pod
            && (p.is_empty() || p.starts_with('/') || p.ends_with('/'))
        {
            return Err(QueryError::Field {
                field: "pod",
                value: p.clone(),
                why: "expected NAMESPACE/NAME or NAME",
            });
        }
        self.since
            .as_deref()
            .map(|s| {
                parse_duration(s).ok_or_else(|| QueryError::Field {
                    field: "since",
                    value: s.into(),
                    why: "expected a duration such as 90s, 5m, 1h30m or 250ms",
                })
            })
            .transpose()
    }

    /// The URL query string (`namespace=…&since=…`), values percent-encoded.
    pub fn to_query_string(&self) -> String {
        let mut parts = Vec::new();
        let mut add = |k: &str, v: &str| parts.push(format!("{k}={}", encode(v)));
        if let Some(v) = &self.namespace {
            add("namespace", v);
        }
        if let Some(v) = &self.pod {
            add("pod", v);
        }
        if let Some(v) = &self.verdict {
            add("verdict", v);
        }
        if let Some(v) = &self.since {
            add("since", v);
        }
        if let Some(v) = self.limit {
            add("limit", &v.to_string());
        }
        parts.join("&")
    }

    fn matches(&self, r: &FlowRecord, after_ms: u64) -> bool {
        let ends = [r.flow.endpoint.as_str(), r.flow.peer.as_str()];
        let in_namespace = |ns: &str, end: &str| end.split_once('/').is_some_and(|(n, _)| n == ns);
        let is_pod = |pod: &str, end: &str| match (pod.split_once('/'), end.split_once('/')) {
            (Some(_), _) => pod == end,
            (None, Some((ns, name))) => {
                name == pod && self.namespace.as_deref().is_none_or(|want| want == ns)
            }
            (None, None) => false,
        };
        r.time_ms >= after_ms
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| ends.iter().any(|e| in_namespace(ns, e)))
            && self
                .pod
                .as_deref()
                .is_none_or(|p| ends.iter().any(|e| is_pod(p, e)))
            && self.verdict.as_deref().is_none_or(|v| {
                r.flow.verdict == v || r.audit.as_ref().is_some_and(|a| a.verdict == v)
            })
    }
}

/// `90s`, `5m`, `1h30m`, `250ms`, `2d`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if let Ok(n) = text.parse::<u64>() {
        return Some(Duration::from_secs(n));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_ms = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        total = total.checked_add(Duration::from_millis(n.checked_mul(unit_ms)?))?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// Percent-encodes a query value (everything but unreserved characters).
pub fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The bounded record of recent flows.
#[derive(Debug)]
pub struct FlowStore {
    node: String,
    capacity: usize,
    records: Mutex<VecDeque<FlowRecord>>,
}

impl FlowStore {
    pub fn new(node: &str, capacity: usize) -> Self {
        FlowStore {
            node: node.into(),
            capacity,
            records: Mutex::new(VecDeque::with_capacity(capacity.min(DEFAULT_CAPACITY))),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Records one flow read at `time_ms`, dropping the oldest when full.
    pub fn push(&self, time_ms: u64, flow: Flow, audit: Option<AuditNote>) {
        if self.capacity == 0 {
            return;
        }
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        if records.len() == self.capacity {
            records.pop_front();
        }
        records.push_back(FlowRecord {
            time_ms,
            node: self.node.clone(),
            flow,
            audit,
        });
    }

    pub fn len(&self) -> usize {
        self.records.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The records `query` selects, oldest first, as of `now_ms`.
    pub fn query(&self, query: &FlowQuery, now_ms: u64) -> Result<Vec<FlowRecord>, QueryError> {
        let since = query.validate()?;
        let after_ms = since.map_or(0, |d| now_ms.saturating_sub(d.as_millis() as u64));
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let mut picked: Vec<FlowRecord> = records
            .iter()
            .filter(|r| query.matches(r, after_ms))
            .cloned()
            .collect();
        keep_newest(&mut picked, query.limit);
        Ok(picked)
    }
}

/// Keeps the last `limit` records (the newest, for records oldest first).
pub fn keep_newest(records: &mut Vec<FlowRecord>, limit: Option<usize>) {
    if let Some(limit) = limit {
        let skip = records.len().saturating_sub(limit);
        records.drain(..skip);
    }
}

/// Records as JSON lines, one object per line (what [`parse_lines`] reads).
pub fn to_lines(records: &[FlowRecord]) -> String {
    let mut out = String::new();
    for r in records {
        out.push_str(&serde_json::to_string(r).expect("a record serializes"));
        out.push('\n');
    }
    out
}

/// Reads JSON lines of [`FlowRecord`]s (what `/flows` and `kubectl netpol flows -o json` write);
/// blank lines are skipped. Errors name the line.
pub fn parse_lines(text: &str) -> Result<Vec<FlowRecord>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A flow of TCP port 80 to `endpoint` (ingress).
    pub(crate) fn flow(verdict: &str, endpoint: &str, peer: &str) -> Flow {
        Flow {
            verdict: verdict.into(),
            reason: "policy".into(),
            direction: "ingress".into(),
            protocol: "TCP".into(),
            src: "10.244.1.2".parse().unwrap(),
            sport: 40000,
            dst: "10.244.2.3".parse().unwrap(),
            dport: 80,
            endpoint: endpoint.into(),
            peer: peer.into(),
            service: None,
            policy: None,
            rule: None,
        }
    }

    #[test]
    fn a_record_is_as_small_as_documented() {
        assert!(std::mem::size_of::<FlowRecord>() <= 360);
    }

    #[test]
    fn keeps_the_newest_capacity_records() {
        let store = FlowStore::new("node-1", 3);
        for t in 0..5 {
            store.push(t, flow("allowed", "x/a", "y/b"), None);
        }
        let all = store.query(&FlowQuery::default(), 10).unwrap();
        assert_eq!(all.iter().map(|r| r.time_ms).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(all[0].node, "node-1");
        let none = FlowStore::new("node-1", 0);
        none.push(1, flow("allowed", "x/a", "y/b"), None);
        assert!(none.is_empty());
    }

    #[test]
    fn filters_by_namespace_pod_verdict_since_and_limit() {
        let store = FlowStore::new("n", 100);
        store.push(1_000, flow("allowed", "x/a", "y/b"), None);
        store.push(2_000, flow("dropped", "x/a", "10.0.0.9"), None);
        store.push(
            3_000,
            flow("allowed", "z/c", "x/a"),
            Some(AuditNote {
                verdict: "would-drop".into(),
                policy: "z/deny".into(),
                rule: String::new(),
            }),
        );
        let times = |q: FlowQuery| -> Vec<u64> {
            store
                .query(&q, 4_000)
                .unwrap()
                .iter()
                .map(|r| r.time_ms)
                .collect()
        };
        let q = |f: fn(&mut FlowQuery)| {
            let mut q = FlowQuery::default();
            f(&mut q);
            q
        };
        assert_eq!(times(q(|q| q.namespace = Some("y".into()))), [1_000]);
        assert_eq!(
            times(q(|q| q.namespace = Some("x".into()))),
            [1_000, 2_000, 3_000]
        );
        assert_eq!(times(q(|q| q.pod = Some("z/c".into()))), [3_000]);
        assert_eq!(times(q(|q| q.pod = Some("b".into()))), [1_000]);
        assert_eq!(
            times(q(|q| {
                q.pod = Some("b".into());
                q.namespace = Some("x".into());
            })),
            Vec::<u64>::new(),
            "a bare name is looked up in the namespace given"
        );
        assert_eq!(times(q(|q| q.verdict = Some("dropped".into()))), [2_000]);
        assert_eq!(times(q(|q| q.verdict = Some("would-drop".into()))), [3_000]);
        assert_eq!(
            times(q(|q| q.since = Some("2500ms".into()))),
            [2_000, 3_000]
        );
        assert_eq!(times(q(|q| q.limit = Some(1))), [3_000]);
    }

    #[test]
    fn bad_fields_are_named() {
        let store = FlowStore::new("n", 1);
        let err = store
            .query(
                &FlowQuery {
                    since: Some("5 minutes".into()),
                    ..Default::default()
                },
                0,
            )
            .unwrap_err();
        assert!(err.to_string().contains("field since"), "{err}");
        let err = FlowQuery {
            verdict: Some("denied".into()),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("field verdict"), "{err}");
    }

    #[test]
    fn durations() {
        let d = |s| parse_duration(s).map(|d| d.as_millis());
        assert_eq!(d("90"), Some(90_000));
        assert_eq!(d("90s"), Some(90_000));
        assert_eq!(d("1h30m"), Some(5_400_000));
        assert_eq!(d("250ms"), Some(250));
        assert_eq!(d("2d"), Some(172_800_000));
        for bad in ["", "m", "5 m", "5x", "-5s", "1.5h"] {
            assert_eq!(d(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn records_round_trip_as_json_lines_and_queries_as_urls() {
        let r = FlowRecord {
            time_ms: 7,
            node: "n".into(),
            flow: flow("allowed", "x/a", "y/b"),
            audit: None,
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains("\"verdict\":\"allowed\""), "{line}");
        assert!(!line.contains("audit"), "{line}");
        assert_eq!(
            parse_lines(&format!("{line}\n\n{line}\n")).unwrap(),
            [r.clone(), r]
        );
        assert!(parse_lines("{").unwrap_err().starts_with("line 1:"));
        let q = FlowQuery {
            pod: Some("x/a b".into()),
            limit: Some(5),
            ..Default::default()
        };
        assert_eq!(q.to_query_string(), "pod=x%2Fa%20b&limit=5");
    }
}
