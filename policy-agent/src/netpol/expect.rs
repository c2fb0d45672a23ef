//! `test --expect FILE`: expected connectivity checked against the policies.
//!
//! The file holds truth tables in the upstream notation, each under a heading naming the
//! protocol and port — `TCP/80` (what `cargo xtask lab probe` prints, `TCP/80 via pod`, is
//! accepted too) — or JSON: `{"expect": [{"from", "to", "port", "protocol", "allowed"}]}`.
//! Row and column names are `NS/POD`, `node/NAME` or addresses. Lines starting with `#` are
//! comments.

use serde::{Deserialize, Serialize};

use super::flows;
use crate::evaluator::Protocol;
use crate::model::Cluster;
use policy_common::truth_table::Table;

/// One expected cell.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expectation {
    pub from: String,
    pub to: String,
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
    pub allowed: bool,
}

fn tcp() -> String {
    "TCP".into()
}

#[derive(Deserialize)]
struct JsonFile {
    expect: Vec<Expectation>,
}

/// The result of `test -o json`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    pub passed: bool,
    pub cells: usize,
    pub wrong: Vec<Wrong>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Wrong {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: String,
    pub expected: bool,
    pub actual: bool,
}

/// Reads an expectation file.
pub fn parse(text: &str) -> Result<Vec<Expectation>, String> {
    if text.trim_start().starts_with('{') {
        let f: JsonFile = serde_json::from_str(text).map_err(|e| format!("JSON: {e}"))?;
        return Ok(f.expect);
    }
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if line.is_empty() || line.starts_with('#') {
            i += 1;
            continue;
        }
        let heading = line.split_whitespace().next().unwrap_or("");
        let (protocol, port) = heading
            .split_once('/')
            .and_then(|(pr, p)| Some((Protocol::parse(pr)?, p.parse::<u16>().ok()?)))
            .ok_or_else(|| {
                format!(
                    "line {}: expected a heading like `TCP/80`, found {line:?}",
                    i + 1
                )
            })?;
        let start = i + 1;
        let mut end = start;
        while end < lines.len()
            && !lines[end].trim().is_empty()
            && !lines[end].trim().starts_with('#')
        {
            end += 1;
        }
        let table = Table::parse(&lines[start..end])
            .map_err(|e| format!("line {}: {}", start + e.line, e.message))?;
        for ((from, to), allowed) in &table.cells {
            out.push(Expectation {
                from: from.clone(),
                to: to.clone(),
                port,
                protocol: protocol.as_str().into(),
                allowed: *allowed,
            });
        }
        i = end;
    }
    Ok(out)
}

/// Checks every expectation with the evaluator.
pub fn check(cluster: &Cluster, expect: &[Expectation]) -> Result<Outcome, String> {
    let mut out = Outcome {
        cells: expect.len(),
        ..Outcome::default()
    };
    let ev = crate::evaluator::Evaluator::new(cluster);
    for e in expect {
        let protocol = Protocol::parse(&e.protocol)
            .ok_or_else(|| format!("{} -> {}: protocol {:?}", e.from, e.to, e.protocol))?;
        let from = flows::parse_target(cluster, &e.from)?;
        let to = flows::parse_target(cluster, &e.to)?;
        let actual = flows::verdict(&ev, &from, &to, e.port, protocol)?.allowed;
        if actual != e.allowed {
            out.wrong.push(Wrong {
                from: e.from.clone(),
                to: e.to.clone(),
                port: e.port,
                protocol: e.protocol.clone(),
                expected: e.allowed,
                actual,
            });
        }
    }
    out.passed = out.wrong.is_empty();
    Ok(out)
}
