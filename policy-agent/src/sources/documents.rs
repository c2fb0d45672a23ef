//! Bounded reading of multi-document YAML (and JSON) text: every document is split off and
//! pre-scanned in one linear pass before serde_yaml sees it, so that no single document can cost
//! more than a bounded amount of parsing.
//!
//! libyaml (under serde_yaml) is quadratic in flow nesting depth — every token revisits every open
//! level's pending simple key — so a 120 KB document of brackets nested 60,000 deep takes seconds
//! to be rejected (by serde_yaml's own recursion limit, after libyaml has scanned all of it). The
//! pre-scan rejects such a document after reading a few hundred bytes.
//!
//! # Splitting
//!
//! A line that starts with `---` or `...` followed by a blank or the line's end is a document
//! marker: YAML forbids such lines inside any content, block or quoted scalars included, so
//! splitting there never cuts a document the parser would read whole. A document is what follows
//! `---` (up to the next marker), or text before any `---` / after a `...` that holds more than
//! blank lines, comments and directives.
//!
//! # Pre-scan limits ([`Limits`])
//!
//! - size: bytes of the document;
//! - nesting depth: open flow collections (`[`, `{`) plus block levels — distinct increasing
//!   indentation columns and `- ` / `? ` entries on a line. Brackets inside quoted scalars, block
//!   scalars, comments and block-context plain scalars are text and do not count;
//! - nodes: scalars, flow collections and aliases;
//! - anchors and aliases together.
//!
//! The scan is a little pessimistic where YAML is subtle (a plain scalar continued on a line that
//! starts with `[` counts as a flow collection), never optimistic: what it calls text, libyaml
//! reads as text too.

use std::ops::Range;

/// Bounds on one document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_depth: usize,
    pub max_nodes: usize,
    pub max_aliases: usize,
}

/// The bounds the manifest source and `kubectl netpol` apply. A large Kubernetes object (an
/// EndpointSlice of 1000 endpoints) has about 10,000 nodes and nests about 10 deep.
pub const LIMITS: Limits = Limits {
    max_bytes: 1024 * 1024,
    max_depth: 100,
    max_nodes: 50_000,
    max_aliases: 32,
};

/// Why a document is not parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("document is {size} bytes, more than the limit of {max} bytes; not parsed")]
    TooLarge { size: usize, max: usize },
    #[error(
        "nesting depth exceeds the limit of {max} (scan stopped after {scanned} bytes); not parsed"
    )]
    TooDeep { max: usize, scanned: usize },
    #[error("more than {max} nodes (scan stopped after {scanned} bytes); not parsed")]
    TooManyNodes { max: usize, scanned: usize },
    #[error("more than {max} anchors and aliases (scan stopped after {scanned} bytes); not parsed")]
    TooManyAliases { max: usize, scanned: usize },
}

/// What the pre-scan of an accepted document found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    pub depth: usize,
    pub nodes: usize,
    pub aliases: usize,
}

/// Why one document yields no value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// serde_yaml's message, its location (if any) counted in lines of the whole text.
    #[error("{message}")]
    Yaml { message: String },
}

/// One document of a text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document<'a> {
    /// 1-based, in the order of the text.
    pub index: usize,
    pub text: &'a str,
    /// Lines of the whole text before the document's first line.
    pub line_offset: usize,
    /// Columns of its first line before the document (3 after `---`, else 0).
    pub column_offset: usize,
}

fn is_marker(line: &[u8], marker: &[u8; 3]) -> bool {
    line.starts_with(marker)
        && line
            .get(3)
            .is_none_or(|c| matches!(c, b' ' | b'\t' | b'\r' | b'\n'))
}

/// Whether `text` holds anything but blank lines, comments and directives.
fn has_content(text: &str) -> bool {
    text.lines().any(|l| {
        let t = l.trim_start();
        !t.is_empty() && !t.starts_with('#') && !l.starts_with('%')
    })
}

/// Splits `text` into its documents (linear in its length).
pub fn split(text: &str) -> Vec<Document<'_>> {
    let mut out = Vec::new();
    // Start of the current document, its line, and whether `---` opened it.
    let mut start = 0;
    let mut start_line = 0;
    let mut explicit = false;
    let mut push = |range: Range<usize>, line: usize, explicit: bool| {
        let body = &text[range];
        if explicit || has_content(body) {
            out.push(Document {
                index: out.len() + 1,
                text: body,
                line_offset: line,
                column_offset: if explicit { 3 } else { 0 },
            });
        }
    };
    let mut offset = 0;
    for (number, line) in text.split_inclusive('\n').enumerate() {
        let bytes = line.as_bytes();
        if is_marker(bytes, b"---") {
            push(start..offset, start_line, explicit);
            (start, start_line, explicit) = (offset + 3, number, true);
        } else if is_marker(bytes, b"...") {
            push(start..offset, start_line, explicit);
            (start, start_line, explicit) = (offset + line.len(), number + 1, false);
        }
        offset += line.len();
    }
    push(start..text.len(), start_line, explicit);
    out
}

fn is_blank(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r')
}

/// A block scalar being skipped: lines indented more than `parent` (or at least `content`, once
/// known) are its text.
struct BlockScalar {
    parent: usize,
    content: Option<usize>,
}

struct Scanner<'l> {
    limits: &'l Limits,
    census: Census,
    /// Open flow collections.
    flow: usize,
    /// Block indentation columns, increasing.
    indents: Vec<usize>,
    /// An unterminated quoted scalar continues on the next line.
    quote: Option<u8>,
    block_scalar: Option<BlockScalar>,
    /// Byte offset of the current line in the document.
    line_start: usize,
}

/// Position after the quoted scalar whose opening quote `q` is just before `p`, or `None` when it
/// continues past the line.
fn close_quote(line: &[u8], mut p: usize, q: u8) -> Option<usize> {
    while p < line.len() {
        match line[p] {
            b'\\' if q == b'"' => p += 2,
            b'\'' if q == b'\'' => {
                if line.get(p + 1) == Some(&b'\'') {
                    p += 2;
                } else {
                    return Some(p + 1);
                }
            }
            c if c == q => return Some(p + 1),
            _ => p += 1,
        }
    }
    None
}

impl Scanner<'_> {
    fn depth(&mut self, dashes: usize, at: usize) -> Result<(), LimitError> {
        let depth = self.indents.len() + dashes + self.flow;
        self.census.depth = self.census.depth.max(depth);
        if depth > self.limits.max_depth {
            return Err(LimitError::TooDeep {
                max: self.limits.max_depth,
                scanned: self.line_start + at,
            });
        }
        Ok(())
    }

    fn node(&mut self, at: usize) -> Result<(), LimitError> {
        self.census.nodes += 1;
        if self.census.nodes > self.limits.max_nodes {
            return Err(LimitError::TooManyNodes {
                max: self.limits.max_nodes,
                scanned: self.line_start + at,
            });
        }
        Ok(())
    }

    fn alias(&mut self, at: usize) -> Result<(), LimitError> {
        self.census.aliases += 1;
        if self.census.aliases > self.limits.max_aliases {
            return Err(LimitError::TooManyAliases {
                max: self.limits.max_aliases,
                scanned: self.line_start + at,
            });
        }
        Ok(())
    }

    /// Scans one line (without its `\n`).
    fn line(&mut self, line: &[u8]) -> Result<(), LimitError> {
        let n = line.len();
        let indent = line.iter().take_while(|c| **c == b' ').count();
        let blank = line[indent..].iter().all(|c| is_blank(*c));
        if let Some(bs) = &mut self.block_scalar {
            if blank {
                return Ok(());
            }
            match bs.content {
                Some(c) if indent >= c => return Ok(()),
                None if indent > bs.parent => {
                    bs.content = Some(indent);
                    return Ok(());
                }
                _ => self.block_scalar = None,
            }
        }
        let mut p = 0;
        if let Some(q) = self.quote {
            match close_quote(line, 0, q) {
                None => return Ok(()),
                Some(end) => {
                    self.quote = None;
                    p = end;
                }
            }
        } else if self.flow == 0 {
            if blank || line[indent] == b'#' {
                return Ok(());
            }
            while self.indents.last().is_some_and(|top| *top > indent) {
                self.indents.pop();
            }
            if self.indents.last() != Some(&indent) {
                self.indents.push(indent);
            }
            self.depth(0, indent)?;
        }
        // Block context: at a position where a node may start (line start, after `- `, `? `,
        // `: `, an anchor or a tag), and the column of the collection a block scalar here
        // belongs to. Flow context: at the start of a token, and after a quoted scalar or a
        // closed collection (where `:` needs no blank after it, as in JSON).
        let mut value_start = p == 0 && self.flow == 0;
        let mut node_col = indent;
        let mut dashes = 0;
        let mut token_start = p == 0;
        let mut adjacent_value = p > 0;
        while p < n {
            let c = line[p];
            if is_blank(c) {
                p += 1;
                continue;
            }
            let after_blank = p == 0 || is_blank(line[p - 1]);
            if c == b'#' && after_blank {
                return Ok(());
            }
            let blank_after = line.get(p + 1).is_none_or(|c| is_blank(*c));
            if self.flow > 0 {
                match c {
                    b'[' | b'{' => {
                        self.flow += 1;
                        self.depth(dashes, p)?;
                        self.node(p)?;
                        token_start = true;
                        adjacent_value = false;
                    }
                    b']' | b'}' => {
                        self.flow = self.flow.saturating_sub(1);
                        token_start = false;
                        adjacent_value = true;
                    }
                    b',' => {
                        token_start = true;
                        adjacent_value = false;
                    }
                    b':' if adjacent_value || blank_after => {
                        token_start = true;
                        adjacent_value = false;
                    }
                    b'\'' | b'"' if token_start => {
                        self.node(p)?;
                        match close_quote(line, p + 1, c) {
                            None => {
                                self.quote = Some(c);
                                return Ok(());
                            }
                            Some(end) => p = end - 1,
                        }
                        token_start = false;
                        adjacent_value = true;
                    }
                    b'&' | b'*' | b'!' if token_start => {
                        if c != b'!' {
                            self.alias(p)?;
                        }
                        if c == b'*' {
                            self.node(p)?;
                            token_start = false;
                        }
                        while p + 1 < n
                            && !is_blank(line[p + 1])
                            && !b",[]{}".contains(&line[p + 1])
                        {
                            p += 1;
                        }
                    }
                    _ => {
                        if token_start {
                            self.node(p)?;
                        }
                        token_start = false;
                        adjacent_value = false;
                    }
                }
                p += 1;
                if self.flow == 0 {
                    // Back in block context, after a node.
                    value_start = false;
                }
                continue;
            }
            if !value_start {
                // After a node in block context: only `: ` makes a new node start.
                if c == b':' && blank_after {
                    value_start = true;
                }
                p += 1;
                continue;
            }
            match c {
                b'-' | b'?' if blank_after => {
                    dashes += 1;
                    node_col = p;
                    self.depth(dashes, p)?;
                    p += 1;
                }
                b'[' | b'{' => {
                    self.flow = 1;
                    self.depth(dashes, p)?;
                    self.node(p)?;
                    token_start = true;
                    adjacent_value = false;
                    p += 1;
                }
                b'\'' | b'"' => {
                    self.node(p)?;
                    node_col = p;
                    match close_quote(line, p + 1, c) {
                        None => {
                            self.quote = Some(c);
                            return Ok(());
                        }
                        Some(end) => p = end,
                    }
                    value_start = false;
                }
                b'|' | b'>' => {
                    self.node(p)?;
                    let explicit = line[p + 1..]
                        .iter()
                        .take_while(|c| !is_blank(**c))
                        .find(|c| c.is_ascii_digit())
                        .map(|d| usize::from(d - b'0'));
                    self.block_scalar = Some(BlockScalar {
                        parent: node_col,
                        content: explicit.map(|d| node_col + d),
                    });
                    return Ok(());
                }
                b'&' | b'*' | b'!' => {
                    if c != b'!' {
                        self.alias(p)?;
                    }
                    if c == b'*' {
                        self.node(p)?;
                        value_start = false;
                    }
                    while p < n && !is_blank(line[p]) {
                        p += 1;
                    }
                }
                _ => {
                    // A plain scalar (or key) starts here.
                    self.node(p)?;
                    node_col = p;
                    value_start = false;
                    p += 1;
                }
            }
        }
        Ok(())
    }
}

/// Checks one document against `limits` in one pass, stopping at the first limit exceeded.
pub fn prescan(text: &str, limits: &Limits) -> Result<Census, LimitError> {
    if text.len() > limits.max_bytes {
        return Err(LimitError::TooLarge {
            size: text.len(),
            max: limits.max_bytes,
        });
    }
    let mut scanner = Scanner {
        limits,
        census: Census::default(),
        flow: 0,
        indents: Vec::new(),
        quote: None,
        block_scalar: None,
        line_start: 0,
    };
    for line in text.split_inclusive('\n') {
        let body = line.strip_suffix('\n').unwrap_or(line);
        scanner.line(body.as_bytes())?;
        scanner.line_start += line.len();
    }
    Ok(scanner.census)
}

/// serde_yaml's messages end with " at line L column C": the message without it.
pub(crate) fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// Parses one pre-scanned document; a location in the error counts lines of the whole text.
fn parse(document: &Document<'_>) -> Result<serde_yaml::Value, DocumentError> {
    prescan(document.text, &LIMITS)?;
    serde_yaml::from_str(document.text).map_err(|e| {
        let mut message = strip_location(&e.to_string());
        if let Some(at) = e.location() {
            let column = at.column()
                + if at.line() == 1 {
                    document.column_offset
                } else {
                    0
                };
            message.push_str(&format!(
                " at line {} column {column}",
                at.line() + document.line_offset
            ));
        }
        DocumentError::Yaml { message }
    })
}

/// Every document of `text` with its 1-based index, each split off, pre-scanned against
/// [`LIMITS`] and parsed on its own: a document that is too costly or broken yields its error and
/// the next ones are still read. Empty documents yield `Value::Null`.
pub fn documents(
    text: &str,
) -> impl Iterator<Item = (usize, Result<serde_yaml::Value, DocumentError>)> + '_ {
    split(text).into_iter().map(|d| (d.index, parse(&d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(text: &str) -> Result<Census, LimitError> {
        prescan(text, &LIMITS)
    }

    fn depth_error(text: &str) -> usize {
        match scan(text) {
            Err(LimitError::TooDeep { max: 100, scanned }) => scanned,
            other => panic!("expected TooDeep, got {other:?} for {:?}…", &text[..40]),
        }
    }

    #[test]
    fn deep_flow_nesting_stops_the_scan_early() {
        let deep = format!("{}{}", "[".repeat(60_000), "]".repeat(60_000));
        let scanned = depth_error(&deep);
        // The top level counts as one: the 100th bracket opens level 101.
        assert_eq!(
            scanned, 99,
            "stopped at the 100th bracket, not after 120 KB"
        );
        let deep = format!("a: {}1{}\n", "{x: ".repeat(60_000), "}".repeat(60_000));
        assert!(depth_error(&deep) < 1000);
        // JSON.
        let deep = format!("{}1{}", r#"{"a":"#.repeat(200), "}".repeat(200));
        depth_error(&deep);
        // Flow collections spanning lines.
        let deep = "[\n".repeat(200);
        depth_error(&deep);
    }

    #[test]
    fn deep_block_nesting_is_counted() {
        let mut text = String::new();
        for i in 0..150 {
            text.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
        }
        depth_error(&text);
        let compact = format!("{}x\n", "- ".repeat(150));
        depth_error(&compact);
        let mixed = (0..150)
            .map(|i| format!("{}- k:\n", "  ".repeat(i)))
            .collect::<String>();
        depth_error(&mixed);
    }

    #[test]
    fn nesting_within_limits_is_accepted() {
        let ok = format!("{}{}", "[".repeat(99), "]".repeat(99));
        assert_eq!(scan(&ok).unwrap().depth, 100);
        let too_deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(depth_error(&too_deep), 99);
        // Siblings do not add up.
        let wide = "[[1], [2], {a: [3]}]\n".repeat(1000);
        assert_eq!(scan(&wide).unwrap().depth, 4);
    }

    #[test]
    fn brackets_in_text_do_not_count() {
        let many = "[".repeat(500);
        let text = format!(
            "a: \"{many}\"\nb: '{many} it''s'\n# {many}\nc: |\n  {many}\n   {many}\n\nd: x{many}\n\
             e: >-\n    {many}\nf: \"multi\n  line {many}\n  end\"\ng: 'a {many}\n  b'\n\
             h: don't {many}\ni: {{k: \"{many}\", l: '{many}'}}\nj: [\"a\\\"{many}\"]\n\
             k: x{many} # {many}\nl: &anchor x{many}\n"
        );
        let census = scan(&text).unwrap();
        assert!(census.depth <= 2, "{census:?}");
    }

    #[test]
    fn text_is_text_only_where_yaml_says_so() {
        let deep = "[".repeat(200);
        // An apostrophe inside a plain scalar starts no quoted scalar.
        depth_error(&format!("a: don't\nb: {deep}\n"));
        // A block scalar ends at the first line indented no more than its key.
        depth_error(&format!("- a: |\n    text\n  b: {deep}\n"));
        depth_error(&format!("a: |\n    text\n  {deep}\n"));
        depth_error(&format!("a: |2\n  text\n {deep}\n"));
        // `:` followed by a non-blank is part of a plain scalar in flow context, so the quote
        // after it starts no quoted scalar that would hide the brackets.
        depth_error(&format!("[a:'b, {deep}\n"));
        // A quoted scalar closed on a later line, then structure.
        depth_error(&format!("a: \"x\n  y\"\nb: {deep}\n"));
        // Comments need a blank before `#`.
        depth_error(&format!("a: b#{deep}\nc: {deep}"));
    }

    #[test]
    fn nodes_and_aliases_are_bounded() {
        let wide = format!("[{}1]", "1,".repeat(60_000));
        assert!(matches!(
            scan(&wide),
            Err(LimitError::TooManyNodes { max: 50_000, scanned }) if scanned < 110_000
        ));
        let lines = "- a\n".repeat(60_000);
        assert!(matches!(scan(&lines), Err(LimitError::TooManyNodes { .. })));
        let aliases = format!("a: &x [1]\nb: [{}]\n", "*x, ".repeat(40));
        assert!(matches!(
            scan(&aliases),
            Err(LimitError::TooManyAliases { max: 32, .. })
        ));
        assert_eq!(scan("a: &x 1\nb: *x\nc: [*x, &y 2]\n").unwrap().aliases, 4);
    }

    #[test]
    fn size_is_bounded() {
        let big = format!("a: \"{}\"\n", "x".repeat(LIMITS.max_bytes));
        let e = scan(&big).unwrap_err();
        assert!(matches!(e, LimitError::TooLarge { max, .. } if max == 1024 * 1024));
        assert!(
            e.to_string()
                .contains("more than the limit of 1048576 bytes")
        );
    }

    #[test]
    fn errors_name_the_limit() {
        let e = scan(&"[".repeat(1000)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "nesting depth exceeds the limit of 100 (scan stopped after 99 bytes); not parsed"
        );
    }

    #[test]
    fn splitting() {
        let text = "%YAML 1.2\n# comment\n---\na: 1\n--- |\n  text\n---\n...\n# tail\n\
                    ---\n---x: 1\n--- {b: 2}\n...\nc: 3\n";
        let docs = split(text);
        let bodies: Vec<&str> = docs.iter().map(|d| d.text).collect();
        assert_eq!(
            bodies,
            vec![
                "\na: 1\n",
                " |\n  text\n",
                "\n",
                "\n---x: 1\n",
                " {b: 2}\n",
                "c: 3\n"
            ]
        );
        assert_eq!(
            docs.iter().map(|d| d.index).collect::<Vec<_>>(),
            (1..=6).collect::<Vec<_>>()
        );
        assert_eq!(docs[1].line_offset, 4);
        assert_eq!(docs[5].line_offset, 13);
        // Without markers, the whole text is one document; nothing but comments is none.
        assert_eq!(split("a: 1\nb: 2\n").len(), 1);
        assert!(split("# only\n\n").is_empty());
        assert!(split("").is_empty());
    }

    #[test]
    fn documents_are_parsed_independently() {
        let deep = "[".repeat(60_000);
        let text = format!("a: 1\n---\n{deep}\n---\nb: [unclosed\n---\n---\nc: 3\n");
        let out: Vec<_> = documents(&text).collect();
        assert_eq!(out.len(), 5);
        assert!(out[0].1.as_ref().unwrap().get("a").is_some());
        assert!(matches!(
            out[1].1,
            Err(DocumentError::Limit(LimitError::TooDeep {
                scanned: 100,
                ..
            }))
        ));
        match &out[2].1 {
            Err(DocumentError::Yaml { message }) => {
                assert!(
                    message.contains("at line 6"),
                    "line of the whole text: {message}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(out[3].1, Ok(serde_yaml::Value::Null));
        assert_eq!(out[4].0, 5);
        assert!(out[4].1.as_ref().unwrap().get("c").is_some());
    }
}
