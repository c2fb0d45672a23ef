//! Truth tables in the notation of the upstream e2e suite: rows = from, columns = to, `.` connected,
//! `X` not connected; `-` marks a cell that was not probed (a pod never probes itself).

use std::collections::BTreeMap;

use super::probe::{Outcome, Protocol, Via};

/// A `from × to` table of verdicts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub rows: Vec<String>,
    pub cols: Vec<String>,
    pub cells: BTreeMap<(String, String), bool>,
}

impl Table {
    pub fn new(rows: Vec<String>, cols: Vec<String>) -> Self {
        Self {
            rows,
            cols,
            cells: BTreeMap::new(),
        }
    }

    pub fn set(&mut self, from: &str, to: &str, connected: bool) {
        if !self.rows.iter().any(|r| r == from) {
            self.rows.push(from.to_string());
        }
        if !self.cols.iter().any(|c| c == to) {
            self.cols.push(to.to_string());
        }
        self.cells
            .insert((from.to_string(), to.to_string()), connected);
    }

    pub fn get(&self, from: &str, to: &str) -> Option<bool> {
        self.cells.get(&(from.to_string(), to.to_string())).copied()
    }

    fn symbol(&self, from: &str, to: &str) -> &'static str {
        match self.get(from, to) {
            Some(true) => ".",
            Some(false) => "X",
            None => "-",
        }
    }

    /// The table as lines of text, columns aligned.
    pub fn lines(&self) -> Vec<String> {
        let w0 = self.rows.iter().map(String::len).max().unwrap_or(0);
        let widths: Vec<usize> = self.cols.iter().map(|c| c.len().max(1)).collect();
        let mut out = Vec::with_capacity(self.rows.len() + 1);
        let mut head = format!("{:w0$}", "");
        for (c, w) in self.cols.iter().zip(&widths) {
            head.push_str(&format!("  {c:w$}"));
        }
        out.push(head.trim_end().to_string());
        for r in &self.rows {
            let mut line = format!("{r:w0$}");
            for (c, w) in self.cols.iter().zip(&widths) {
                line.push_str(&format!("  {:w$}", self.symbol(r, c)));
            }
            out.push(line.trim_end().to_string());
        }
        out
    }

    /// Cells present in both tables that differ: (from, to, expected, observed).
    pub fn differences(&self, observed: &Table) -> Vec<(String, String, bool, bool)> {
        self.cells
            .iter()
            .filter_map(|((f, t), &want)| {
                let got = observed.get(f, t)?;
                (got != want).then(|| (f.clone(), t.clone(), want, got))
            })
            .collect()
    }

    /// Cells expected but never observed.
    pub fn missing(&self, observed: &Table) -> Vec<(String, String)> {
        self.cells
            .keys()
            .filter(|(f, t)| observed.get(f, t).is_none())
            .cloned()
            .collect()
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_upstream_notation() {
        let mut t = Table::new(
            vec!["x/a".into(), "x/b".into()],
            vec!["x/a".into(), "x/b".into()],
        );
        t.set("x/a", "x/b", true);
        t.set("x/b", "x/a", false);
        assert_eq!(
            t.lines(),
            vec!["     x/a  x/b", "x/a  -    .", "x/b  X    -"]
        );
    }

    #[test]
    fn differences_are_reported_per_cell() {
        let mut want = Table::default();
        want.set("a", "b", true);
        want.set("b", "a", false);
        want.set("a", "c", true);
        let mut got = Table::default();
        got.set("a", "b", true);
        got.set("b", "a", true);
        assert_eq!(
            want.differences(&got),
            vec![("b".into(), "a".into(), false, true)]
        );
        assert_eq!(want.missing(&got), vec![("a".into(), "c".into())]);
    }
}
