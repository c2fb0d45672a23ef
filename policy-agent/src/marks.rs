//! Netfilter rules of the node that use the `skb->mark` bits the agent carries the source
//! endpoint of Service traffic in (`--mark-mask`).
//!
//! Between `from_pod` and the post-DNAT hook (`to_pod` of a local backend, `to_network` on an
//! uplink) the packet crosses netfilter. A rule there that sets, clears or copies those bits
//! loses or forges the deferred decision; a rule that matches on them mistakes the agent's bits
//! for its own (kube-router, k3s's NetworkPolicy controller, accepts what carries 0x10000 or
//! 0x20000; the default mask 0x0fff0000 covers both). So at start and every minute the agent
//! reads the rules — `nft -j list ruleset`, `iptables-save`, `ip6tables-save`, whichever exist —
//! warns about every rule whose mark bits overlap the mask, naming it and the bits, and sets
//! `policy_agent_mark_mask_conflicts` to their number.
//!
//! A rule's bits are every bit of the packet or connection mark it reads or writes: the mask of a
//! match (all 32 bits when it compares the whole mark), the bits a mark target sets, clears or
//! toggles (`--set-xmark V/M`: V|M; `--and-mark M`: !M), the masks of CONNMARK's save and
//! restore. The connection mark counts too, as CONNMARK and `meta mark set ct mark` copy it into
//! the packet mark. Parsing is pure ([`iptables_save`], [`nft_json`]); tools that are missing are
//! skipped. Rules iptables-nft shows are also in the nft ruleset (its `ip`/`ip6` tables, with
//! their targets as opaque `xt` expressions): those tables are read from iptables-save only.

use std::{collections::BTreeSet, io, process::Command, sync::Arc, time::Duration};

use serde_json::Value;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

const ALL: u32 = u32::MAX;

/// A rule that uses mark bits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MarkUse {
    /// Where the rule is and what it says: `iptables mangle: -A PREROUTING …`, or
    /// `nft inet t chain c handle 4`.
    pub rule: String,
    /// Every packet or connection mark bit it reads or writes.
    pub bits: u32,
}

/// The rules of `uses` whose bits overlap `mask`, with only the overlapping bits.
pub fn conflicts(uses: &[MarkUse], mask: u32) -> Vec<MarkUse> {
    uses.iter()
        .filter(|u| u.bits & mask != 0)
        .map(|u| MarkUse {
            rule: u.rule.clone(),
            bits: u.bits & mask,
        })
        .collect()
}

// ---- iptables-save ----

/// The mark uses in `iptables-save` (or `ip6tables-save`) output; `tool` names the source in
/// each [`MarkUse::rule`].
pub fn iptables_save(text: &str, tool: &str) -> Vec<MarkUse> {
    let mut table = "";
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim();
            continue;
        }
        if !line.starts_with("-A ") {
            continue;
        }
        let bits = iptables_rule_bits(&tokens(line));
        if bits != 0 {
            out.push(MarkUse {
                rule: format!("{tool} {table}: {}", shorten(line)),
                bits,
            });
        }
    }
    out
}

/// The tables an iptables-save output lists when it comes from iptables-nft (its header says
/// `(nf_tables)`); `None` for the legacy backend, whose tables nft does not show.
pub fn nf_tables_backed(text: &str) -> Option<BTreeSet<String>> {
    let nft = text
        .lines()
        .any(|l| l.starts_with('#') && l.contains("(nf_tables)"));
    nft.then(|| {
        text.lines()
            .filter_map(|l| l.strip_prefix('*'))
            .map(|t| t.trim().to_owned())
            .collect()
    })
}

/// Shell-like words of a saved rule: double quotes group, backslash escapes.
fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
                in_word = true;
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(word);
    }
    out
}

fn number(s: &str) -> Option<u32> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `V/M` → V|M; a bare `V` compares or sets the whole mark.
fn value_mask(s: &str) -> u32 {
    match s.split_once('/') {
        Some((v, m)) => number(v).unwrap_or(ALL) | number(m).unwrap_or(ALL),
        None => ALL,
    }
}

fn iptables_rule_bits(words: &[String]) -> u32 {
    let mut bits = 0;
    let mut copies = false;
    let mut copy_masks = false;
    let mut i = 0;
    while i < words.len() {
        let arg = words.get(i + 1).map(String::as_str).unwrap_or("");
        match words[i].as_str() {
            // Never look inside a comment.
            "--comment" => i += 1,
            "--mark" | "--set-xmark" | "--set-mark" | "--tproxy-mark" => {
                bits |= value_mask(arg);
                i += 1;
            }
            "--or-mark" | "--xor-mark" => {
                bits |= number(arg).unwrap_or(ALL);
                i += 1;
            }
            "--and-mark" => {
                bits |= !number(arg).unwrap_or(0);
                i += 1;
            }
            "--nfmask" | "--ctmask" | "--mask" => {
                bits |= number(arg).unwrap_or(ALL);
                copy_masks = true;
                i += 1;
            }
            "--save-mark" | "--restore-mark" => copies = true,
            _ => {}
        }
        i += 1;
    }
    if copies && !copy_masks {
        bits |= ALL;
    }
    bits
}

fn shorten(line: &str) -> String {
    const MAX: usize = 240;
    match line.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &line[..end]),
        None => line.to_owned(),
    }
}

// ---- nft -j ----

/// The mark uses in `nft -j list ruleset` output, except in the tables `skip(family, table)`
/// names (those iptables-nft manages, read from iptables-save instead).
pub fn nft_json(
    text: &str,
    skip: impl Fn(&str, &str) -> bool,
) -> Result<Vec<MarkUse>, serde_json::Error> {
    let doc: Value = serde_json::from_str(text)?;
    let mut out = Vec::new();
    for item in doc["nftables"].as_array().into_iter().flatten() {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let s = |k: &str| rule[k].as_str().unwrap_or("?");
        let (family, table, chain) = (s("family"), s("table"), s("chain"));
        if skip(family, table) {
            continue;
        }
        let bits = rule["expr"]
            .as_array()
            .into_iter()
            .flatten()
            .fold(0, |acc, stmt| acc | statement_bits(stmt));
        if bits != 0 {
            let mut name = format!("nft {family} {table} chain {chain}");
            if let Some(h) = rule["handle"].as_u64() {
                name.push_str(&format!(" handle {h}"));
            }
            if let Some(c) = rule["comment"].as_str() {
                name.push_str(&format!(" comment {c:?}"));
            }
            out.push(MarkUse { rule: name, bits });
        }
    }
    Ok(out)
}

/// `meta mark` or `ct mark` (also the older `{"meta": "mark"}` form).
fn is_mark(v: &Value) -> bool {
    ["meta", "ct"].iter().any(|k| match v.get(k) {
        Some(Value::String(s)) => s == "mark",
        Some(o) => o.get("key").and_then(Value::as_str) == Some("mark"),
        None => false,
    })
}

fn constant(v: &Value) -> Option<u32> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .or_else(|| v.as_str().and_then(number))
}

/// The mark bits the value of `v` depends on: a masked mark (`meta mark & 0x4000`) its mask,
/// a bare mark all of it.
fn read_bits(v: &Value) -> u32 {
    if is_mark(v) {
        return ALL;
    }
    if let Some([a, b]) = v.get("&").and_then(Value::as_array).map(Vec::as_slice)
        && is_mark(a)
        && let Some(mask) = constant(b)
    {
        return mask;
    }
    match v {
        Value::Array(items) => items.iter().fold(0, |acc, i| acc | read_bits(i)),
        Value::Object(map) => map.values().fold(0, |acc, i| acc | read_bits(i)),
        _ => 0,
    }
}

/// The bits `key set value` may change, when `value` is `key` combined with constants
/// (`meta mark | 0x4000`, `^`, `&`); `None` for anything else (a replacement).
fn changed_bits(value: &Value, key: &Value) -> Option<u32> {
    if value == key {
        return Some(0);
    }
    for op in ["|", "^", "&"] {
        if let Some([a, b]) = value.get(op).and_then(Value::as_array).map(Vec::as_slice) {
            let c = constant(b)?;
            let inner = changed_bits(a, key)?;
            return Some(inner | if op == "&" { !c } else { c });
        }
    }
    None
}

fn statement_bits(stmt: &Value) -> u32 {
    if let Some(m) = stmt.get("mangle") {
        let (key, value) = (&m["key"], &m["value"]);
        if is_mark(key) {
            return changed_bits(value, key).unwrap_or(ALL);
        }
        return read_bits(value);
    }
    // iptables-nft's compat expressions outside its own tables: the values are not shown.
    if let Some(xt) = stmt.get("xt")
        && let Some(name) = xt["name"].as_str()
        && ["MARK", "CONNMARK", "mark", "connmark", "TPROXY"].contains(&name)
    {
        return ALL;
    }
    read_bits(stmt)
}

// ---- reading the node's rules ----

/// What one scan found.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    /// Rules overlapping the mask, with the overlapping bits.
    pub conflicts: Vec<MarkUse>,
    /// The sources that could be read (`nft`, `iptables-save`, `ip6tables-save`).
    pub read: Vec<&'static str>,
}

/// Runs `program args`; `None` (debug-logged) when it is missing or fails.
fn output(program: &'static str, args: &[&str]) -> Option<String> {
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => Some(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(out) => {
            debug!(
                program,
                status = %out.status,
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "mark-mask check: skipping this source"
            );
            None
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            debug!(
                program,
                "mark-mask check: not installed; skipping this source"
            );
            None
        }
        Err(e) => {
            debug!(program, error = %e, "mark-mask check: skipping this source");
            None
        }
    }
}

/// Reads the rules of the agent's network namespace with the tools in `PATH`.
pub fn scan(mask: u32) -> Scan {
    let mut scan = Scan::default();
    let mut uses = Vec::new();
    let mut nft_backed: Vec<(&str, BTreeSet<String>)> = Vec::new();
    for (tool, family) in [("iptables-save", "ip"), ("ip6tables-save", "ip6")] {
        if let Some(text) = output(tool, &[]) {
            scan.read.push(tool);
            uses.extend(iptables_save(&text, tool.trim_end_matches("-save")));
            if let Some(tables) = nf_tables_backed(&text) {
                nft_backed.push((family, tables));
            }
        }
    }
    if let Some(text) = output("nft", &["-j", "list", "ruleset"]) {
        let skip = |family: &str, table: &str| {
            nft_backed
                .iter()
                .any(|(f, tables)| *f == family && tables.contains(table))
        };
        match nft_json(&text, skip) {
            Ok(found) => {
                scan.read.push("nft");
                uses.extend(found);
            }
            Err(e) => debug!(error = %e, "mark-mask check: unreadable nft -j output; skipped"),
        }
    }
    scan.conflicts = conflicts(&uses, mask);
    scan
}

/// How often the rules are read again.
pub const INTERVAL: Duration = Duration::from_secs(60);

/// Scans at once and then every [`INTERVAL`], keeping `policy_agent_mark_mask_conflicts` current
/// and warning about each conflicting rule when it appears.
pub async fn watch(mask: u32, metrics: Arc<Metrics>) {
    let mut reported: BTreeSet<MarkUse> = BTreeSet::new();
    let mut readable: Option<bool> = None;
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tick.tick().await;
        let Ok(found) = tokio::task::spawn_blocking(move || scan(mask)).await else {
            return;
        };
        metrics
            .mark_mask_conflicts
            .set(found.conflicts.len() as i64);
        let now_readable = !found.read.is_empty();
        if readable != Some(now_readable) {
            if now_readable {
                debug!(sources = ?found.read, "mark-mask check: reading the node's rules");
            } else {
                info!(
                    "mark-mask check: none of nft, iptables-save, ip6tables-save could be run; \
                     rules using the --mark-mask bits cannot be found"
                );
            }
            readable = Some(now_readable);
        }
        if !now_readable {
            continue;
        }
        let now: BTreeSet<MarkUse> = found.conflicts.into_iter().collect();
        for c in now.difference(&reported) {
            warn!(
                rule = %c.rule,
                bits = %format!("{:#010x}", c.bits),
                mark_mask = %format!("{mask:#010x}"),
                "a netfilter rule uses skb->mark bits of --mark-mask: Service traffic decisions \
                 after DNAT can be lost or forged; choose a --mark-mask clear of them"
            );
        }
        if !reported.is_empty() && now.is_empty() {
            info!("no netfilter rule uses the --mark-mask bits any more");
        }
        reported = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_MASK: u32 = 0x0fff_0000;

    /// kube-proxy (iptables mode) and flannel, as iptables-save prints them.
    const KUBE_PROXY: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Wed Dec  2 18:21:41 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-TCOU7JCQXEZGVUNU - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment "flanneld masq" -s 10.42.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SERVICES -d 10.43.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU
-A KUBE-SVC-TCOU7JCQXEZGVUNU ! -s 10.42.0.0/16 -d 10.43.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-MARK-MASQ
COMMIT
# Completed on Wed Dec  2 18:21:41 2026
# Generated by iptables-save v1.8.9 (nf_tables) on Wed Dec  2 18:21:41 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:FLANNEL-FWD - [0:0]
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A KUBE-FIREWALL -m comment --comment "kubernetes firewall for dropping marked packets" -m mark --mark 0x8000/0x8000 -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A FLANNEL-FWD -s 10.42.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
COMMIT
# Completed on Wed Dec  2 18:21:41 2026
"#;

    /// kube-router's NetworkPolicy controller (k3s without --disable-network-policy).
    const KUBE_ROUTER: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Wed Dec  2 18:30:02 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-NWPLCY-DEFAULT - [0:0]
:KUBE-POD-FW-J5EIPGHHTBPYVOFN - [0:0]
:KUBE-ROUTER-FORWARD - [0:0]
-A FORWARD -m comment --comment "rule to explicitly ACCEPT traffic that comply to network policies" -m mark --mark 0x20000/0x20000 -j ACCEPT
-A FORWARD -m comment --comment "kube-router netpol - TEMCG2JMHZYE7H7T" -j KUBE-ROUTER-FORWARD
-A KUBE-NWPLCY-DEFAULT -m comment --comment "rule to mark traffic matching a network policy" -j MARK --set-xmark 0x10000/0x10000
-A KUBE-POD-FW-J5EIPGHHTBPYVOFN -m comment --comment "rule for stateful firewall for pod" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-POD-FW-J5EIPGHHTBPYVOFN -d 10.42.0.9/32 -m comment --comment "run through default ingress network policy  chain" -j KUBE-NWPLCY-DEFAULT
-A KUBE-POD-FW-J5EIPGHHTBPYVOFN -m comment --comment "rule to log dropped traffic POD name:web namespace: shop" -m mark ! --mark 0x10000/0x10000 -m limit --limit 10/min --limit-burst 10 -j NFLOG --nflog-group 100
-A KUBE-POD-FW-J5EIPGHHTBPYVOFN -m comment --comment "rule to REJECT traffic destined for POD name:web namespace: shop" -m mark ! --mark 0x10000/0x10000 -j REJECT --reject-with icmp-port-unreachable
-A KUBE-POD-FW-J5EIPGHHTBPYVOFN -j MARK --set-xmark 0x0/0x10000
-A KUBE-POD-FW-J5EIPGHHTBPYVOFN -m comment --comment "set mark to ACCEPT traffic that comply to network policies" -j MARK --set-xmark 0x20000/0x20000
-A KUBE-ROUTER-FORWARD -d 10.42.0.9/32 -m comment --comment "rule to jump traffic destined to POD name:web namespace: shop to chain KUBE-POD-FW-J5EIPGHHTBPYVOFN" -j KUBE-POD-FW-J5EIPGHHTBPYVOFN
COMMIT
# Completed on Wed Dec  2 18:30:02 2026
"#;

    /// kube-proxy in nftables mode plus a rule that replaces the whole mark, as `nft -j list
    /// ruleset` prints them (nftables 1.0.6); and an iptables-nft table.
    const NFT: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "ip", "name": "kube-proxy", "handle": 1}}, {"chain": {"family": "ip", "table": "kube-proxy", "name": "mark-for-masquerade", "handle": 1}}, {"chain": {"family": "ip", "table": "kube-proxy", "name": "masquerading", "handle": 2}}, {"chain": {"family": "ip", "table": "kube-proxy", "name": "filter-forward", "handle": 3, "type": "filter", "hook": "forward", "prio": -110, "policy": "accept"}}, {"rule": {"family": "ip", "table": "kube-proxy", "chain": "mark-for-masquerade", "handle": 4, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"meta": {"key": "mark"}}, 16384]}}}]}}, {"rule": {"family": "ip", "table": "kube-proxy", "chain": "masquerading", "handle": 5, "expr": [{"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 16384]}, "right": 0}}, {"return": null}]}}, {"rule": {"family": "ip", "table": "kube-proxy", "chain": "masquerading", "handle": 6, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"^": [{"meta": {"key": "mark"}}, 16384]}}}]}}, {"rule": {"family": "ip", "table": "kube-proxy", "chain": "masquerading", "handle": 7, "expr": [{"masquerade": {"flags": "fully-random"}}]}}, {"rule": {"family": "ip", "table": "kube-proxy", "chain": "filter-forward", "handle": 8, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}, {"jump": {"target": "service-endpoints-check"}}]}}, {"table": {"family": "inet", "name": "t", "handle": 2}}, {"chain": {"family": "inet", "table": "t", "name": "c", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}, {"rule": {"family": "inet", "table": "t", "chain": "c", "handle": 2, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 65536}}]}}, {"rule": {"family": "inet", "table": "t", "chain": "c", "handle": 3, "comment": "clear", "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"&": [{"meta": {"key": "mark"}}, 4294918143]}}}]}}, {"rule": {"family": "inet", "table": "t", "chain": "c", "handle": 4, "expr": [{"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"meta": {"key": "mark"}}}}]}}, {"rule": {"family": "inet", "table": "t", "chain": "c", "handle": 5, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"&": [{"ct": {"key": "mark"}}, 255]}}}]}}, {"rule": {"family": "inet", "table": "t", "chain": "c", "handle": 6, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 16}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "t", "chain": "c", "handle": 7, "expr": [{"match": {"op": "!=", "left": {"&": [{"ct": {"key": "mark"}}, 1]}, "right": 0}}, {"accept": null}]}}, {"table": {"family": "ip", "name": "mangle", "handle": 3}}, {"chain": {"family": "ip", "table": "mangle", "name": "PREROUTING", "handle": 1, "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"}}, {"rule": {"family": "ip", "table": "mangle", "chain": "PREROUTING", "handle": 2, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"xt": {"type": "target", "name": "MARK"}}]}}]}"#;

    fn bits_of(uses: &[MarkUse], part: &str) -> Vec<u32> {
        uses.iter()
            .filter(|u| u.rule.contains(part))
            .map(|u| u.bits)
            .collect()
    }

    #[test]
    fn kube_proxy_marks_are_found_and_clear_of_the_default_mask() {
        let uses = iptables_save(KUBE_PROXY, "iptables");
        assert_eq!(uses.len(), 5, "{uses:#?}");
        assert_eq!(bits_of(&uses, "KUBE-MARK-MASQ -j MARK"), [0x4000]);
        assert_eq!(bits_of(&uses, "MARK --set-xmark 0x4000/0x0"), [0x4000]);
        assert_eq!(bits_of(&uses, "--mark 0x8000/0x8000"), [0x8000]);
        assert!(uses[0].rule.starts_with("iptables nat: -A KUBE-MARK-MASQ"));
        assert!(
            bits_of(&uses, "service portals").is_empty(),
            "no mark, no use"
        );
        assert_eq!(conflicts(&uses, DEFAULT_MASK), []);
    }

    #[test]
    fn kube_router_marks_conflict_with_the_default_mask() {
        let uses = iptables_save(KUBE_ROUTER, "iptables");
        let found = conflicts(&uses, DEFAULT_MASK);
        assert_eq!(found.len(), 6, "{found:#?}");
        assert!(
            found
                .iter()
                .all(|c| c.rule.starts_with("iptables filter: -A "))
        );
        assert_eq!(bits_of(&found, "KUBE-NWPLCY-DEFAULT -m comment"), [0x10000]);
        assert_eq!(
            bits_of(&found, "network policies\" -j MARK --set-xmark 0x20000"),
            [0x20000]
        );
        assert_eq!(bits_of(&found, "-A FORWARD"), [0x20000]);
        // The mask the README suggests for k3s is clear of kube-router and kube-proxy.
        assert_eq!(conflicts(&uses, 0xfff0_0000), []);
        assert_eq!(
            conflicts(&iptables_save(KUBE_PROXY, "iptables"), 0xfff0_0000),
            []
        );
    }

    #[test]
    fn every_mark_option_counts_its_bits() {
        let rule = |r: &str| {
            let text = format!("*mangle\n-A PREROUTING {r}\nCOMMIT\n");
            iptables_save(&text, "iptables")
                .first()
                .map_or(0, |u| u.bits)
        };
        assert_eq!(rule("-j MARK --set-xmark 0x5/0xffffffff"), ALL);
        assert_eq!(rule("-j MARK --set-mark 0x5"), ALL);
        assert_eq!(rule("-j MARK --set-mark 0x10/0x30"), 0x30);
        assert_eq!(rule("-j MARK --or-mark 0x4000"), 0x4000);
        assert_eq!(rule("-j MARK --and-mark 0xffff0fff"), 0xf000);
        assert_eq!(rule("-m mark --mark 0x1"), ALL);
        assert_eq!(rule("-m connmark --mark 0x1/0x1 -j ACCEPT"), 1);
        assert_eq!(
            rule("-j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"),
            ALL
        );
        assert_eq!(
            rule("-j CONNMARK --save-mark --nfmask 0xff --ctmask 0xff"),
            0xff
        );
        assert_eq!(rule("-j CONNMARK --restore-mark"), ALL);
        assert_eq!(
            rule("-p tcp -j TPROXY --on-port 15001 --on-ip 0.0.0.0 --tproxy-mark 0x1/0x1"),
            1
        );
        assert_eq!(rule("-m comment --comment \"--mark 0x10000\" -j ACCEPT"), 0);
        assert_eq!(rule("-s 10.0.0.0/8 -j ACCEPT"), 0);
    }

    #[test]
    fn nft_rules_are_read_with_the_bits_they_touch() {
        let uses = nft_json(NFT, |_, _| false).unwrap();
        let by_handle = |table: &str, h: u32| {
            uses.iter()
                .find(|u| {
                    u.rule.starts_with(&format!("nft {table} chain "))
                        && (u.rule.ends_with(&format!(" handle {h}"))
                            || u.rule.contains(&format!(" handle {h} ")))
                })
                .map(|u| u.bits)
        };
        // kube-proxy's nftables mode: 0x4000 only, and the rule without a mark not at all.
        assert_eq!(by_handle("ip kube-proxy", 4), Some(0x4000));
        assert_eq!(by_handle("ip kube-proxy", 5), Some(0x4000));
        assert_eq!(by_handle("ip kube-proxy", 6), Some(0x4000));
        assert_eq!(by_handle("ip kube-proxy", 7), None);
        assert_eq!(by_handle("ip kube-proxy", 8), None);
        // `meta mark set 0x10000` replaces the whole mark.
        assert_eq!(by_handle("inet t", 2), Some(ALL));
        assert_eq!(by_handle("inet t", 3), Some(0xc000));
        assert_eq!(by_handle("inet t", 4), Some(ALL));
        assert_eq!(by_handle("inet t", 5), Some(ALL));
        assert_eq!(by_handle("inet t", 6), Some(ALL));
        assert_eq!(by_handle("inet t", 7), Some(1));
        assert!(
            uses.iter()
                .any(|u| u.rule == "nft inet t chain c handle 3 comment \"clear\"")
        );
        // An opaque iptables-nft target outside the skipped tables: its bits are unknown.
        assert_eq!(by_handle("ip mangle", 2), Some(ALL));

        let found = conflicts(&uses, DEFAULT_MASK);
        let names: Vec<&str> = found.iter().map(|c| c.rule.as_str()).collect();
        assert_eq!(
            names,
            [
                "nft inet t chain c handle 2",
                "nft inet t chain c handle 4",
                "nft inet t chain c handle 5",
                "nft inet t chain c handle 6",
                "nft ip mangle chain PREROUTING handle 2",
            ]
        );
        assert!(found.iter().all(|c| c.bits == DEFAULT_MASK));
    }

    #[test]
    fn iptables_nft_tables_are_read_once() {
        let tables = nf_tables_backed(KUBE_PROXY).expect("iptables-nft output");
        assert_eq!(tables, BTreeSet::from(["filter".into(), "nat".into()]));
        let legacy = KUBE_PROXY.replace(" (nf_tables)", "");
        assert_eq!(nf_tables_backed(&legacy), None);
        let mangle = BTreeSet::from(["mangle".to_owned()]);
        let uses = nft_json(NFT, |family, table| {
            family == "ip" && mangle.contains(table)
        })
        .unwrap();
        assert!(
            !uses.iter().any(|u| u.rule.contains("ip mangle")),
            "{uses:#?}"
        );
        assert!(uses.iter().any(|u| u.rule.contains("ip kube-proxy")));
    }

    #[test]
    fn unreadable_nft_output_is_an_error() {
        assert!(nft_json("not json", |_, _| false).is_err());
        assert_eq!(nft_json("{}", |_, _| false).unwrap(), []);
    }
}
