//! `kubectl netpol`: every lint code on a state that has it and on one that does not; explain
//! and what-if against the reference evaluator on generated clusters (fixed seeds); the graph
//! parsed back; expectations checked; exit codes of the binary.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use policy_agent::evaluator::{self, Flow, Peer, Protocol};
use policy_agent::model::{Cluster, ObjectKey};
use policy_agent::netpol::{
    expect, explain, flows, graph, lint,
    state::{self, Source, State},
    whatif,
};
use policy_common::Direction;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

fn state_of(yaml: &str) -> State {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.yaml");
    std::fs::write(&path, yaml).unwrap();
    state::load(&Source::Files(vec![path])).unwrap()
}

fn codes(yaml: &str) -> Vec<(String, String, String)> {
    lint::lint(state_of(yaml).cluster())
        .into_iter()
        .map(|f| (f.code.to_string(), f.object, f.field))
        .collect()
}

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {team: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec: {containers: [{name: c, ports: [{name: dns, containerPort: 53, protocol: UDP}, {name: dns-tcp, containerPort: 53}]}]}
status: {podIP: 10.244.1.10}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: prod}
spec:
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: prod, labels: {app: db}}
spec: {containers: [{name: c, ports: [{name: pg, containerPort: 5432}]}]}
status: {podIP: 10.244.1.20}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: dns, namespace: prod}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}, podSelector: {matchLabels: {k8s-app: kube-dns}}}]
    ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]
"#;

/// One lint code: a policy set that has it and a corrected one that does not.
fn check_code(code: &str, bad: &str, good: &str) {
    let has = |yaml: &str| {
        codes(&format!("{BASE}---\n{yaml}"))
            .into_iter()
            .any(|c| c.0 == code)
    };
    assert!(
        has(bad),
        "{code} not reported for:\n{bad}\n{:#?}",
        codes(&format!("{BASE}---\n{bad}"))
    );
    assert!(
        !has(good),
        "{code} reported for:\n{good}\n{:#?}",
        codes(&format!("{BASE}---\n{good}"))
    );
}

#[test]
fn the_base_state_is_clean() {
    assert_eq!(codes(BASE), vec![]);
}

#[test]
fn lint_invalid() {
    let policy = |cidr: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: prod}}\nspec:\n  podSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{{from: [{{ipBlock: {{cidr: {cidr}}}}}]}}]\n"
        )
    };
    check_code("invalid", &policy("10.0.0.0/33"), &policy("10.0.0.0/16"));
    let f = codes(&format!("{BASE}---\n{}", policy("10.0.0.0/33")));
    assert!(
        f.contains(&(
            "invalid".into(),
            "NetworkPolicy prod/p".into(),
            "spec.ingress[0].from[0].ipBlock.cidr".into()
        )),
        "{f:#?}"
    );
}

#[test]
fn lint_selects_nothing() {
    let policy = |sel: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: prod}}\nspec:\n  podSelector: {{matchLabels: {{{sel}}}}}\n  ingress: [{{}}]\n"
        )
    };
    check_code("selects-nothing", &policy("run: web"), &policy("app: web"));
    let f = lint::lint(state_of(&format!("{BASE}---\n{}", policy("run: web"))).cluster());
    let f = f.iter().find(|f| f.code == "selects-nothing").unwrap();
    assert!(f.message.contains("no pod has run=web"), "{}", f.message);
}

#[test]
fn lint_peer_matches_nothing() {
    let policy = |peer: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: prod}}\nspec:\n  podSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{{from: [{peer}]}}]\n"
        )
    };
    check_code(
        "peer-matches-nothing",
        &policy("{namespaceSelector: {matchLabels: {name: prod}}}"),
        &policy("{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: prod}}}"),
    );
    let f = lint::lint(
        state_of(&format!(
            "{BASE}---\n{}",
            policy("{namespaceSelector: {matchLabels: {name: prod}}}")
        ))
        .cluster(),
    );
    let f = f.iter().find(|f| f.code == "peer-matches-nothing").unwrap();
    assert!(f.fix.contains("kubernetes.io/metadata.name"), "{}", f.fix);
    check_code(
        "peer-matches-nothing",
        &policy("{podSelector: {matchLabels: {app: webb}}}"),
        &policy("{podSelector: {matchLabels: {app: web}}}"),
    );
}

#[test]
fn lint_shadowed() {
    let policy = |peers: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: prod}}\nspec:\n  podSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{{from: [{peers}]}}]\n"
        )
    };
    check_code(
        "shadowed",
        &policy("{podSelector: {}}, {podSelector: {matchLabels: {app: web}}}"),
        &policy(
            "{podSelector: {matchLabels: {app: db}}}, {podSelector: {matchLabels: {app: web}}}",
        ),
    );
    // Whole rules: the second rule's peer and port are within the first's.
    let rules = |second: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: prod}}\nspec:\n  podSelector: {{matchLabels: {{app: db}}}}\n  ingress:\n  - from: [{{podSelector: {{}}}}]\n    ports: [{{port: 5000, endPort: 6000}}]\n  - {second}\n"
        )
    };
    check_code(
        "shadowed",
        &rules("{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}"),
        &rules("{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 8080}]}"),
    );
}

#[test]
fn lint_missing_dns() {
    let egress = |extra: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: other}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress: [{{to: [{{namespaceSelector: {{}}}}], ports: [{{port: 443}}{extra}]}}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: other}}\nspec: {{containers: [{{name: c}}]}}\n"
        )
    };
    check_code(
        "missing-dns",
        &egress(""),
        &egress(", {port: 53, protocol: UDP}, {port: 53, protocol: TCP}"),
    );
    // UDP alone is a warning (TCP 53 carries large answers).
    let f = lint::lint(
        state_of(&format!(
            "{BASE}---\n{}",
            egress(", {port: 53, protocol: UDP}")
        ))
        .cluster(),
    );
    let f = f.iter().find(|f| f.code == "missing-dns").unwrap();
    assert_eq!(f.severity, lint::Severity::Warning);
    assert!(f.message.contains("TCP 53"), "{}", f.message);
}

#[test]
fn lint_ignored_rules() {
    let policy = |types: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: prod}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  policyTypes: [{types}]\n  ingress: [{{}}]\n  egress: [{{}}]\n"
        )
    };
    check_code(
        "ignored-rules",
        &policy("Ingress"),
        &policy("Ingress, Egress"),
    );
}

#[test]
fn lint_named_port_unresolved() {
    let policy = |port: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: prod}}\nspec:\n  podSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{{ports: [{{port: {port}}}]}}]\n"
        )
    };
    check_code("named-port-unresolved", &policy("postgres"), &policy("pg"));
}

#[test]
fn lint_ipblock_matches_pods() {
    let policy = |cidr: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: prod}}\nspec:\n  podSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{{from: [{{ipBlock: {{cidr: {cidr}}}}}]}}]\n"
        )
    };
    check_code(
        "ipblock-matches-pods",
        &policy("10.244.0.0/16"),
        &policy("192.168.0.0/16"),
    );
    let f = lint::lint(state_of(&format!("{BASE}---\n{}", policy("10.244.0.0/16"))).cluster());
    assert!(
        f.iter()
            .any(|f| f.code == "ipblock-matches-pods" && f.severity == lint::Severity::Info)
    );
}

#[test]
fn lint_isolates_without_allow() {
    let deny = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: prod}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";
    let allow = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow, namespace: prod}\nspec:\n  podSelector: {}\n  ingress: [{from: [{podSelector: {}}]}]\n";
    check_code(
        "isolates-without-allow",
        deny,
        &format!("{deny}---\n{allow}"),
    );
}

#[test]
fn lint_one_sided() {
    // The gateway may send to tier=service pods on 8080, but their ingress admits only tier=service.
    let state = |ingress_from: &str| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: gateway, namespace: prod, labels: {{tier: gateway}}}}
spec: {{containers: [{{name: c}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: orders, namespace: prod, labels: {{tier: service}}}}
spec: {{containers: [{{name: c, ports: [{{containerPort: 8080}}]}}]}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: gateway, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{tier: gateway}}}}
  policyTypes: [Egress]
  egress: [{{to: [{{podSelector: {{matchLabels: {{tier: service}}}}}}], ports: [{{port: 8080}}]}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: services, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{tier: service}}}}
  ingress: [{{from: [{{podSelector: {{matchLabels: {{tier: {ingress_from}}}}}}}]}}]
"#
        )
    };
    check_code("one-sided", &state("service"), &state("gateway"));
    let f = codes(&format!("{BASE}---\n{}", state("service")));
    assert!(
        f.contains(&(
            "one-sided".into(),
            "NetworkPolicy prod/gateway".into(),
            "spec.egress[0]".into()
        )),
        "{f:#?}"
    );
}

#[test]
fn every_code_has_a_test_and_a_severity() {
    let source = include_str!("netpol.rs");
    for (code, _) in lint::CODES {
        assert!(
            source.contains(&format!("check_code(\n        \"{code}\""))
                || source.contains(&format!("check_code(\"{code}\"")),
            "no test for {code}"
        );
    }
    assert_eq!(lint::CODES.len(), 10);
}

/// The examples: explain names the isolating policies and says no rule allows frontend → database.
#[test]
fn explain_frontend_to_database() {
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-netpol"))
        .args(["explain", "-f"])
        .arg(examples())
        .args([
            "--from",
            "shop/frontend",
            "--to",
            "shop/database",
            "--port",
            "5432",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["allowed"], false);
    assert_eq!(v["egress"]["isolated"], true);
    assert_eq!(v["egress"]["allowed"], false);
    assert_eq!(v["egress"]["allowed_by"], serde_json::json!([]));
    assert_eq!(
        v["egress"]["policies"],
        serde_json::json!(["shop/allow-dns", "shop/default-deny-all", "shop/frontend"])
    );
    assert_eq!(
        v["ingress"]["policies"],
        serde_json::json!(["shop/database", "shop/default-deny-all"])
    );
    assert_eq!(v["ingress"]["allowed_by"], serde_json::json!([]));
    assert_eq!(v["ingress"]["nearest_miss"]["policy"], "shop/database");
    let reasons = v["ingress"]["nearest_miss"]["reasons"].to_string();
    assert!(
        reasons.contains("app=backend") && reasons.contains("app=frontend"),
        "{reasons}"
    );

    let ok = Command::new(env!("CARGO_BIN_EXE_kubectl-netpol"))
        .args(["explain", "-f"])
        .arg(examples())
        .args([
            "--from",
            "shop/backend",
            "--to",
            "shop/database",
            "--port",
            "postgres",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert_eq!(ok.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(v["allowed"], true);
    assert_eq!(v["port"], 5432);
    assert_eq!(
        v["ingress"]["allowed_by"],
        serde_json::json!([{"policy": "shop/database", "rule": "ingress[0]"}])
    );
}

#[test]
fn usage_and_input_errors_exit_2() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kubectl-netpol"))
            .args(args)
            .output()
            .unwrap()
    };
    let ex = examples();
    let ex = ex.to_str().unwrap();
    for args in [
        vec!["lint"],
        vec![
            "explain",
            "-f",
            ex,
            "--from",
            "shop/nope",
            "--to",
            "shop/database",
        ],
        vec![
            "explain",
            "-f",
            "/nonexistent",
            "--from",
            "a/b",
            "--to",
            "a/c",
        ],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.yaml"), "kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {name: p, namespace: x}\nspec: {podSelector: [}\n").unwrap();
    let out = run(&["lint", "-f", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.yaml: document 1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A deterministic generator of small clusters (xorshift, fixed seeds).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
        of[(self.next() % of.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn random_policy(g: &mut Gen, ns: &str, i: usize) -> String {
    let labels = ["a", "b", "c"];
    let peer = |g: &mut Gen| -> String {
        match g.next() % 5 {
            0 => format!(
                "{{podSelector: {{matchLabels: {{app: {}}}}}}}",
                g.pick(&labels)
            ),
            1 => format!(
                "{{namespaceSelector: {{matchLabels: {{team: {}}}}}}}",
                g.pick(&["x", "y"])
            ),
            2 => format!(
                "{{namespaceSelector: {{}}, podSelector: {{matchExpressions: [{{key: app, operator: {}, values: [{}]}}]}}}}",
                g.pick(&["In", "NotIn"]),
                g.pick(&labels)
            ),
            3 => format!(
                "{{ipBlock: {{cidr: 10.244.{}.0/24, except: [10.244.{}.{}/30]}}}}",
                g.next() % 2 + 1,
                g.next() % 2 + 1,
                4 * (g.next() % 4)
            ),
            _ => "{podSelector: {}}".into(),
        }
    };
    let port = |g: &mut Gen| -> String {
        match g.next() % 4 {
            0 => "{port: 80}".into(),
            1 => "{port: http}".into(),
            2 => "{port: 50, endPort: 90, protocol: TCP}".into(),
            _ => "{port: 53, protocol: UDP}".into(),
        }
    };
    let rule = |g: &mut Gen, side: &str| -> String {
        let mut r = String::from("{");
        if g.chance(80) {
            let n = g.next() % 2 + 1;
            let peers: Vec<String> = (0..n).map(|_| peer(g)).collect();
            r.push_str(&format!("{side}: [{}], ", peers.join(", ")));
        }
        if g.chance(70) {
            let n = g.next() % 2 + 1;
            let ports: Vec<String> = (0..n).map(|_| port(g)).collect();
            r.push_str(&format!("ports: [{}]", ports.join(", ")));
        }
        r.push('}');
        r
    };
    let selector = if g.chance(30) {
        "{}".to_string()
    } else {
        format!("{{matchLabels: {{app: {}}}}}", g.pick(&labels))
    };
    let types = g.pick(&["[Ingress]", "[Egress]", "[Ingress, Egress]"]);
    let ingress: Vec<String> = (0..g.next() % 3).map(|_| rule(g, "from")).collect();
    let egress: Vec<String> = (0..g.next() % 3).map(|_| rule(g, "to")).collect();
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: {ns}}}\nspec:\n  podSelector: {selector}\n  policyTypes: {types}\n  ingress: [{}]\n  egress: [{}]\n",
        ingress.join(", "),
        egress.join(", ")
    )
}

fn random_cluster(seed: u64, pods: usize, policies: usize) -> (String, Gen) {
    let mut g = Gen(seed);
    let mut docs = vec![
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {team: x}}\n".to_string(),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: y, labels: {team: y}}\n".to_string(),
    ];
    for i in 0..pods {
        let ns = g.pick(&["x", "y"]);
        let app = g.pick(&["a", "b", "c"]);
        let node = i % 2 + 1;
        let port = g.pick(&[
            "{name: http, containerPort: 80}",
            "{name: http, containerPort: 81}",
            "{containerPort: 53, protocol: UDP}",
        ]);
        docs.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: {ns}, labels: {{app: {app}}}}}\nspec: {{nodeName: node-{node}, containers: [{{name: c, ports: [{port}]}}]}}\nstatus: {{podIP: 10.244.{node}.{}, hostIP: 172.18.0.{}}}\n",
            i + 2,
            node + 1
        ));
    }
    for i in 0..policies {
        let ns = g.pick(&["x", "y"]);
        docs.push(random_policy(&mut g, ns, i));
    }
    (docs.join("---\n"), g)
}

/// explain agrees with the evaluator on every pod pair and declared port, and its rule traces say
/// exactly which rules allow.
#[test]
fn explain_agrees_with_the_evaluator() {
    for seed in [1u64, 7, 42, 1234, 99_991] {
        let (yaml, _) = random_cluster(seed, 10, 6);
        let state = state_of(&yaml);
        let cluster = state.cluster();
        for a in cluster.pods.keys() {
            for b in cluster.pods.keys() {
                let (from, to) = (flows::Target::Pod(a.clone()), flows::Target::Pod(b.clone()));
                for (port, protocol) in flows::declared_ports(&cluster.pods[b]) {
                    let e = explain::explain(cluster, &from, &to, port, protocol).unwrap();
                    let flow = Flow {
                        src: Peer::Pod {
                            pod: a.clone(),
                            ip: cluster.pods[a].ips[0],
                        },
                        dst: Peer::Pod {
                            pod: b.clone(),
                            ip: cluster.pods[b].ips[0],
                        },
                        protocol,
                        port,
                    };
                    let v = evaluator::evaluate(cluster, &flow);
                    assert_eq!(
                        e.allowed, v.allowed,
                        "seed {seed}: {a} -> {b} {protocol}/{port}"
                    );
                    assert_eq!(
                        e.egress.allowed_by,
                        v.egress
                            .allowing
                            .iter()
                            .map(explain::rule_name)
                            .collect::<Vec<_>>()
                    );
                    assert_eq!(
                        e.ingress.allowed_by,
                        v.ingress
                            .allowing
                            .iter()
                            .map(explain::rule_name)
                            .collect::<Vec<_>>()
                    );
                    for (d, verdict) in [
                        (Direction::Egress, &v.egress),
                        (Direction::Ingress, &v.ingress),
                    ] {
                        let traced: Vec<_> = evaluator::trace(cluster, &flow, d)
                            .into_iter()
                            .filter(|t| t.matches())
                            .map(|t| t.rule)
                            .collect();
                        if verdict.outcome == evaluator::Outcome::AllowedByPolicy
                            || verdict.outcome == evaluator::Outcome::Denied
                        {
                            assert_eq!(traced, verdict.allowing, "seed {seed}: {a} -> {b} {d:?}");
                        }
                        // A denied direction always names its nearest miss when some rule exists.
                        let side = if d == Direction::Egress {
                            &e.egress
                        } else {
                            &e.ingress
                        };
                        if verdict.outcome == evaluator::Outcome::Denied
                            && !evaluator::trace(cluster, &flow, d).is_empty()
                        {
                            assert!(
                                side.nearest_miss
                                    .as_ref()
                                    .is_some_and(|m| !m.reasons.is_empty()),
                                "seed {seed}: {a} -> {b} {d:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Every flow between pods, pairwise, straight from the evaluator.
fn brute_force(cluster: &Cluster) -> BTreeMap<(String, String, u16, Protocol), bool> {
    let mut out = BTreeMap::new();
    for (a, pa) in &cluster.pods {
        for (b, pb) in &cluster.pods {
            if a == b {
                continue;
            }
            for (port, protocol) in flows::declared_ports(pb) {
                let flow = Flow {
                    src: Peer::Pod {
                        pod: a.clone(),
                        ip: pa.ips[0],
                    },
                    dst: Peer::Pod {
                        pod: b.clone(),
                        ip: pb.ips[0],
                    },
                    protocol,
                    port,
                };
                out.insert(
                    (a.to_string(), b.to_string(), port, protocol),
                    evaluator::evaluate(cluster, &flow).allowed,
                );
            }
        }
    }
    out
}

/// what-if's changes are exactly the pod-to-pod flows whose evaluator verdict differs — on small
/// clusters (every flow judged) and on clusters above the table size (only flows that can change).
#[test]
fn what_if_agrees_with_the_evaluator() {
    for (seed, pods) in [
        (3u64, 12),
        (11, 12),
        (2024, 20),
        (5, whatif::TABLE_PODS + 8),
        (77, whatif::TABLE_PODS + 8),
    ] {
        let (yaml, mut g) = random_cluster(seed, pods, 5);
        let before = state_of(&yaml);
        let mut after = before.clone();
        let ns = g.pick(&["x", "y"]);
        let added = state_of(&random_policy(&mut g, ns, 100));
        after.apply(
            added
                .store
                .cluster
                .policies
                .values()
                .cloned()
                .map(Into::into)
                .collect(),
        );
        let report = whatif::what_if(before.cluster(), after.cluster());
        let (b, a) = (brute_force(before.cluster()), brute_force(after.cluster()));
        let expected: BTreeSet<(String, String, u16, Protocol, bool, bool)> = b
            .iter()
            .filter(|(k, v)| a[*k] != **v)
            .map(|(k, v)| (k.0.clone(), k.1.clone(), k.2, k.3, *v, a[k]))
            .collect();
        let got: BTreeSet<_> = report
            .changes
            .iter()
            .filter(|c| c.from.contains('/') && c.to.contains('/'))
            .map(|c| {
                (
                    c.from.clone(),
                    c.to.clone(),
                    c.port,
                    c.protocol,
                    c.before,
                    c.after,
                )
            })
            .collect();
        assert_eq!(got, expected, "seed {seed}");
        if pods <= whatif::TABLE_PODS {
            assert!(!report.tables.is_empty());
        }
    }
}

/// Applying the examples' policies to their pods: what-if lists the flows the policies cut, and
/// keeps the ones the allows keep open.
#[test]
fn what_if_applying_the_example_policies() {
    let before = state::load(&Source::Files(vec![
        examples().join("00-namespaces.yaml"),
        examples().join("10-shop-pods.yaml"),
        examples().join("lab"),
    ]))
    .unwrap();
    let mut after = before.clone();
    let (objects, _) = state::read_files(&[examples().join("20-network-policies.yaml")]).unwrap();
    after.apply(objects);
    let report = whatif::what_if(before.cluster(), after.cluster());
    let changed: BTreeSet<(String, String, u16)> = report
        .changes
        .iter()
        .map(|c| (c.from.clone(), c.to.clone(), c.port))
        .collect();
    assert!(
        changed.contains(&("default/debug".into(), "shop/backend".into(), 8080)),
        "{changed:?}"
    );
    assert!(
        changed.contains(&("shop/frontend".into(), "shop/database".into(), 5432)),
        "{changed:?}"
    );
    assert!(
        report.changes.iter().all(|c| c.before && !c.after),
        "{:?}",
        report.changes
    );
    assert!(!changed.contains(&("shop/backend".into(), "shop/database".into(), 5432)));
    assert!(!changed.contains(&("default/debug".into(), "shop/frontend".into(), 8080)));
    assert!(!report.tables.is_empty());
}

/// A minimal reading of the DOT `graph` prints: node ids with labels, and edges with labels.
fn parse_dot(text: &str) -> (BTreeMap<String, String>, BTreeMap<(String, String), String>) {
    let mut nodes = BTreeMap::new();
    let mut edges = BTreeMap::new();
    let quoted = |s: &str| -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = None::<String>;
        let mut esc = false;
        for ch in s.chars() {
            match (&mut cur, ch) {
                (Some(c), '\\') if !esc => {
                    esc = true;
                    c.push(ch);
                }
                (Some(c), '"') if !esc => {
                    out.push(std::mem::take(c));
                    cur = None;
                }
                (Some(c), _) => {
                    esc = false;
                    c.push(ch);
                }
                (None, '"') => cur = Some(String::new()),
                (None, _) => {}
            }
        }
        out
    };
    for line in text.lines().map(str::trim) {
        if line.starts_with('"') && line.contains(" -> ") {
            let q = quoted(line);
            edges.insert((q[0].clone(), q[1].clone()), q[2].clone());
        } else if line.starts_with('"') && line.contains("[label=") {
            let q = quoted(line);
            nodes.insert(q[0].clone(), q[1].clone());
        }
    }
    assert!(text.starts_with("digraph") && text.trim_end().ends_with('}'));
    (nodes, edges)
}

#[test]
fn graph_of_the_examples_parses_back_to_the_verdicts() {
    let state = state::load(&Source::Files(vec![examples(), examples().join("lab")])).unwrap();
    let cluster = state.cluster();
    let dot = graph::dot(&graph::build(cluster, None));
    let (nodes, edges) = parse_dot(&dot);
    let id_of = |name: &str| {
        nodes
            .iter()
            .find(|(_, l)| l.split("\\n").next() == Some(name))
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| panic!("no node {name} in\n{dot}"))
    };
    let label = |a: &str, b: &str| edges.get(&(id_of(a), id_of(b))).cloned();
    assert_eq!(label("frontend", "backend").as_deref(), Some("TCP/8080"));
    assert_eq!(label("backend", "database").as_deref(), Some("TCP/5432"));
    assert_eq!(label("frontend", "database"), None);
    assert_eq!(label("debug", "database"), None);
    assert_eq!(label("world", "frontend").as_deref(), Some("TCP/8080"));
    assert!(nodes[&id_of("database")].contains("isolated: ingress, egress"));
    // Every pod-to-pod edge is a flow the evaluator allows, and every allowed flow has its edge.
    let pods: Vec<&ObjectKey> = cluster.pods.keys().collect();
    for a in &pods {
        for b in &pods {
            if a == b {
                continue;
            }
            let ports: Vec<String> = flows::declared_ports(&cluster.pods[*b])
                .into_iter()
                .filter(|(p, pr)| {
                    flows::verdict(
                        &policy_agent::evaluator::Evaluator::new(cluster),
                        &flows::Target::Pod((*a).clone()),
                        &flows::Target::Pod((*b).clone()),
                        *p,
                        *pr,
                    )
                    .unwrap()
                    .allowed
                })
                .map(|(p, pr)| format!("{pr}/{p}"))
                .collect();
            let want = (!ports.is_empty()).then(|| ports.join(", "));
            assert_eq!(label(&a.name, &b.name), want, "{a} -> {b}");
        }
    }
}

#[test]
fn graph_renders_png_through_graphviz() {
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-netpol"))
        .args(["graph", "-o", "png", "-f"])
        .arg(examples())
        .arg("-f")
        .arg(examples().join("lab"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{} (setup installs graphviz)",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.starts_with(b"\x89PNG\r\n\x1a\n"));
    assert!(out.stdout.len() > 10_000, "{} bytes", out.stdout.len());
}

#[test]
fn expectations_pass_and_fail_per_cell() {
    let text = "# the three tiers\nTCP/8080\n-              shop/frontend  shop/backend\nshop/frontend  -              .\nshop/backend   X              -\n\nTCP/5432 via pod\n              shop/database\nshop/backend  .\nshop/frontend X\n";
    let state = state::load(&Source::Files(vec![examples()])).unwrap();
    let cells = expect::parse(text).unwrap();
    assert_eq!(cells.len(), 4);
    let outcome = expect::check(state.cluster(), &cells).unwrap();
    assert!(outcome.passed, "{:?}", outcome.wrong);
    let wrong = text.replace("shop/frontend X", "shop/frontend .");
    let outcome = expect::check(state.cluster(), &expect::parse(&wrong).unwrap()).unwrap();
    assert_eq!(
        outcome.wrong,
        vec![expect::Wrong {
            from: "shop/frontend".into(),
            to: "shop/database".into(),
            port: 5432,
            protocol: "TCP".into(),
            expected: true,
            actual: false,
        }]
    );
    // Through the binary: exit 1 with the wrong cell named.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("expect.txt");
    std::fs::write(&file, &wrong).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-netpol"))
        .args(["test", "-f"])
        .arg(examples())
        .arg("--expect")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("WRONG shop/frontend -> shop/database TCP/5432")
    );
    let json = r#"{"expect": [{"from": "shop/backend", "to": "shop/database", "port": 5432, "allowed": true}]}"#;
    assert!(
        expect::check(state.cluster(), &expect::parse(json).unwrap())
            .unwrap()
            .passed
    );
    assert!(
        expect::parse("TCP/80\na b\na . Y\n")
            .unwrap_err()
            .contains("line 3")
    );
}

#[test]
fn costly_documents_are_rejected_before_parsing_and_the_rest_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deep.yaml");
    let namespace = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n";
    std::fs::write(
        &path,
        format!(
            "{}\n---\nkind: [unclosed\n---\n{namespace}",
            "[".repeat(60_000)
        ),
    )
    .unwrap();
    let Err(state::LoadError::Invalid { errors, .. }) = state::load(&Source::Files(vec![path]))
    else {
        panic!("the file is invalid");
    };
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("deep.yaml: document 1: nesting depth exceeds the limit of 100"),
        "{errors:?}"
    );
    assert!(errors[1].contains("deep.yaml: document 2"), "{errors:?}");
}

#[test]
fn labels_are_checked_on_objects_and_workload_templates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: prod}}\n\
             spec:\n  template:\n    metadata: {{labels: {{app: {}}}}}\n    \
             spec: {{containers: [{{name: c}}]}}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {{name: x, labels: {{\"a/b/c\": v}}}}\n",
            "w".repeat(64)
        ),
    )
    .unwrap();
    let Err(state::LoadError::Invalid { errors, .. }) = state::load(&Source::Files(vec![path]))
    else {
        panic!("the labels are invalid");
    };
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains(
            "bad.yaml: document 1: Deployment: spec.template.metadata.labels[\"app\"]: value \
             longer than 63 characters"
        ),
        "{errors:?}"
    );
    assert!(
        errors[1].contains("document 2: Namespace \"x\": metadata.labels[\"a/b/c\"]"),
        "{errors:?}"
    );
}

/// `graph -o json` is the same graph as the DOT: same nodes, same edges with their ports.
#[test]
fn graph_json_is_the_dot_graph() {
    let run = |format: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_kubectl-netpol"))
            .args(["graph", "-o", format, "-f"])
            .arg(examples())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let v: serde_json::Value = serde_json::from_str(&run("json")).unwrap();
    let dot = run("dot");
    let id_of = |label: &str| {
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["label"] == label)
            .unwrap_or_else(|| panic!("a node {label}: {v}"))["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let edges = v["edges"].as_array().unwrap();
    assert_eq!(edges.len(), dot.matches(" -> ").count(), "{v}\n{dot}");
    let (backend, database) = (id_of("backend"), id_of("database"));
    let edge = edges
        .iter()
        .find(|e| e["from"] == backend.as_str() && e["to"] == database.as_str())
        .unwrap_or_else(|| panic!("backend -> database: {v}"));
    assert_eq!(edge["ports"], serde_json::json!([[5432, "TCP"]]), "{edge}");
    assert!(dot.contains(&format!(
        "\"{backend}\" -> \"{database}\" [label=\"TCP/5432\""
    )));
    assert!(
        !edges
            .iter()
            .any(|e| e["from"] == id_of("frontend").as_str() && e["to"] == database.as_str()),
        "frontend never reaches the database: {v}"
    );
    let db = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["label"] == "database")
        .unwrap();
    assert_eq!(db["isolated_ingress"], true);
}

/// Policies in audit: explain's verdict is the enforced one, the audit part says what enforcing
/// them would change (would-drop naming the isolating policies, would-allow naming the rule), in
/// the text and in the JSON.
#[test]
fn explain_shows_policies_in_audit_apart() {
    let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {kubernetes.io/metadata.name: x}, annotations: {policy-agent/audit: "true"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {kubernetes.io/metadata.name: y}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 80}]}]}
status: {phase: Running, podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: y, labels: {app: b}}
spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 80}, {containerPort: 81}]}]}
status: {phase: Running, podIP: 10.0.0.2}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: y}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-a, namespace: y, annotations: {policy-agent/audit: "true"}}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: a}}}], ports: [{port: 80}]}]
"#;
    let state = state_of(yaml);
    let cluster = state.cluster();
    let (a, b) = (
        flows::Target::Pod(ObjectKey::new("x", "a")),
        flows::Target::Pod(ObjectKey::new("y", "b")),
    );
    // y/b -> x/a: allowed (x/deny-ingress is in audit through its namespace); would-drop.
    let e = explain::explain(cluster, &b, &a, 80, Protocol::Tcp).unwrap();
    assert!(e.allowed);
    assert_eq!(e.ingress.outcome, "not-isolated");
    assert!(e.ingress.policies.is_empty());
    assert_eq!(e.ingress.audited, vec!["x/deny-ingress".to_string()]);
    let audit = e.audit.as_ref().unwrap();
    assert!(!audit.allowed);
    assert_eq!(
        audit.changes,
        vec![explain::AuditChange {
            direction: "ingress",
            verdict: "would-drop",
            policies: vec!["x/deny-ingress".into()],
            rule: None,
        }]
    );
    let text = explain::render(&e);
    assert!(text.contains("ALLOWED"), "{text}");
    assert!(
        text.contains("audit: would-drop at ingress of the destination: x/deny-ingress"),
        "{text}"
    );
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(
        json["audit"]["changes"][0]["verdict"], "would-drop",
        "{json}"
    );
    assert_eq!(
        json["ingress"]["audited"],
        serde_json::json!(["x/deny-ingress"])
    );

    // x/a -> y/b:80 is denied by the enforced y/deny-ingress; y/allow-a (audit) would allow it.
    let e = explain::explain(cluster, &a, &b, 80, Protocol::Tcp).unwrap();
    assert!(!e.allowed);
    assert_eq!(e.ingress.policies, vec!["y/deny-ingress".to_string()]);
    assert_eq!(e.ingress.audited, vec!["y/allow-a".to_string()]);
    let audit = e.audit.as_ref().unwrap();
    assert!(audit.allowed);
    assert_eq!(
        audit.changes,
        vec![explain::AuditChange {
            direction: "ingress",
            verdict: "would-allow",
            policies: vec!["y/allow-a".into()],
            rule: Some("ingress[0]".into()),
        }]
    );
    let text = explain::render(&e);
    assert!(text.contains("DENIED"), "{text}");
    assert!(
        text.contains("audit: would-allow at ingress of the destination: y/allow-a ingress[0]"),
        "{text}"
    );
    // Port 81: denied either way; the audited policy is shown, and changes nothing.
    let e = explain::explain(cluster, &a, &b, 81, Protocol::Tcp).unwrap();
    assert!(!e.allowed);
    let audit = e.audit.as_ref().unwrap();
    assert!(!audit.allowed && audit.changes.is_empty());
    assert!(explain::render(&e).contains("would not change this flow"));

    // Without annotations there is no audit part and the verdicts are the enforced ones.
    let plain = yaml
        .replace(", annotations: {policy-agent/audit: \"true\"}", "")
        .replace("annotations: {policy-agent/audit: \"true\"}", "");
    let state = state_of(&plain);
    let e = explain::explain(state.cluster(), &b, &a, 80, Protocol::Tcp).unwrap();
    assert!(!e.allowed && e.audit.is_none());
    assert!(serde_json::to_value(&e).unwrap().get("audit").is_none());
    let e = explain::explain(state.cluster(), &a, &b, 80, Protocol::Tcp).unwrap();
    assert!(e.allowed && e.audit.is_none());
}
