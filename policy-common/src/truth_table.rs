//! Truth tables in the notation of the upstream Kubernetes e2e suite: rows = from, columns = to,
//! `.` connected, `X` not connected, `-` a cell with no verdict (a pod never probes itself). The
//! lab prints its probes this way and `kubectl netpol test` reads expectations written this way,
//! so a table a probe printed can be pasted as an expectation.

use std::collections::BTreeMap;
use std::format;
use std::string::{String, ToString};
use std::vec::Vec;

/// A `from × to` table of verdicts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub rows: Vec<String>,
    pub cols: Vec<String>,
    pub cells: BTreeMap<(String, String), bool>,
}

/// A line of a table that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number within the text given to [`Table::parse`].
    pub line: usize,
    pub message: String,
}

impl core::fmt::Display for ParseError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
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

    /// Reads what [`Table::lines`] prints: a header line of column names (optionally starting
    /// with `-`, as the upstream suite prints it), then one line per row: its name and one of
    /// `.`, `X` or `-` per column.
    pub fn parse(lines: &[&str]) -> Result<Table, ParseError> {
        let err = |line: usize, message: String| ParseError { line, message };
        let Some((head, body)) = lines.split_first() else {
            return Err(err(1, "empty table".into()));
        };
        let mut cols: Vec<String> = head.split_whitespace().map(ToString::to_string).collect();
        if cols.first().is_some_and(|c| c == "-") {
            cols.remove(0);
        }
        if cols.is_empty() {
            return Err(err(1, "the header names no column".into()));
        }
        let mut table = Table::new(Vec::new(), cols.clone());
        for (i, line) in body.iter().enumerate() {
            let mut words = line.split_whitespace();
            let Some(row) = words.next() else { continue };
            let symbols: Vec<&str> = words.collect();
            if symbols.len() != cols.len() {
                return Err(err(
                    i + 2,
                    format!(
                        "row {row}: {} cells for {} columns",
                        symbols.len(),
                        cols.len()
                    ),
                ));
            }
            table.rows.push(row.to_string());
            for (col, symbol) in cols.iter().zip(symbols) {
                match symbol {
                    "." => table.set(row, col, true),
                    "X" | "x" => table.set(row, col, false),
                    "-" => {}
                    other => {
                        return Err(err(
                            i + 2,
                            format!("row {row}, column {col}: {other:?} is not `.`, `X` or `-`"),
                        ));
                    }
                }
            }
        }
        Ok(table)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

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
    fn parses_what_it_prints() {
        let mut t = Table::new(
            vec!["x/a".into(), "x/b".into()],
            vec!["x/a".into(), "x/b".into()],
        );
        t.set("x/a", "x/b", true);
        t.set("x/b", "x/a", false);
        let lines = t.lines();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        assert_eq!(Table::parse(&lines).unwrap(), t);
        let upstream = ["-\tx/a\tx/b", "x/a\t.\tX", "x/b\tX\t."];
        let u = Table::parse(&upstream).unwrap();
        assert_eq!(u.get("x/a", "x/b"), Some(false));
        assert_eq!(u.get("x/b", "x/b"), Some(true));
        let e = Table::parse(&["a b", "a . Y"]).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("\"Y\""), "{e}");
        assert_eq!(Table::parse(&["a b", "a ."]).unwrap_err().line, 2);
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
