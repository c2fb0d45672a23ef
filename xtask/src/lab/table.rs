//! Truth tables in the notation of the upstream e2e suite: rows = from, columns = to, `.` connected,
//! `X` not connected; `-` marks a cell that was not probed (a pod never probes itself).

use super::probe::{Outcome, Protocol, Via};

pub use policy_common::truth_table::Table;

/// Two tables next to each other under their titles.
pub fn side_by_side(left: (&str, &Table), right: (&str, &Table)) -> String {
    let l = left.1.lines();
    let r = right.1.lines();
    let w = l
        .iter()
        .map(String::len)
        .chain([left.0.len()])
        .max()
        .unwrap_or(0);
    let mut out = format!("{:w$}    {}\n", left.0, right.0);
    for i in 0..l.len().max(r.len()) {
        let a = l.get(i).map(String::as_str).unwrap_or("");
        let b = r.get(i).map(String::as_str).unwrap_or("");
        out.push_str(format!("{a:w$}    {b}").trim_end());
        out.push('\n');
    }
    out
}

/// Groups probe outcomes into one table per (protocol, port, via), in first-seen order; rows and
/// columns follow the order in which names first appear (as source or destination).
pub fn from_outcomes(outcomes: &[Outcome]) -> Vec<((Protocol, u16, Via), Table)> {
    let mut seen: Vec<&str> = Vec::new();
    for o in outcomes {
        for n in [o.from.as_str(), o.to.as_str()] {
            if !seen.contains(&n) {
                seen.push(n);
            }
        }
    }
    let rank = |n: &String| seen.iter().position(|s| s == n).unwrap_or(usize::MAX);
    let mut groups: Vec<((Protocol, u16, Via), Table)> = Vec::new();
    for o in outcomes {
        let key = (o.protocol, o.port, o.via);
        let idx = match groups.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                groups.push((key, Table::default()));
                groups.len() - 1
            }
        };
        groups[idx].1.set(&o.from, &o.to, o.connected);
    }
    for (_, t) in &mut groups {
        t.rows.sort_by_key(rank);
        t.cols.sort_by_key(rank);
    }
    groups
}

pub fn title(protocol: Protocol, port: u16, via: Via) -> String {
    format!("{protocol}/{port} via {}", via.as_str())
}
