//! The lab driven through its command line, as a user would: `xtask lab up/apply/get/probe/
//! delete/down`. Needs root (network namespaces, bpffs); fails without it. Each test uses its own
//! lab prefix and tears its lab down even when it fails.

use std::collections::BTreeSet;

use serde_json::Value;

mod common;

use common::*;

fn root_links() -> BTreeSet<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}

fn examples() -> (String, String) {
    let d = root().join("deploy/examples");
    (d.join("lab").display().to_string(), d.display().to_string())
}

/// Without agents nothing is enforced: every pod reaches every other pod on every declared port,
/// TCP, UDP and SCTP, through pod IPs and through Service ClusterIPs; nodes and ext reach pods; pods
/// reach ext through the node's masquerade.
#[test]
fn unpoliced_lab_connects_everything() {
    require_root();
    let lab = LabGuard {
        prefix: prefix('u'),
    };
    lab.ok(&["up", "--nodes", "2", "--no-agent"]);
    let dir = std::env::temp_dir().join(format!("{}-pods.yaml", lab.prefix));
    let mut yaml = String::new();
    for ns in ["x", "y"] {
        for pod in ["a", "b"] {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\n\
                 spec:\n  containers:\n  - name: c\n    ports:\n    - {{containerPort: 80, name: serve-80-tcp}}\n    - {{containerPort: 81, name: serve-81-udp, protocol: UDP}}\n    - {{containerPort: 82, name: serve-82-sctp, protocol: SCTP}}\n\
                 ---\napiVersion: v1\nkind: Service\nmetadata: {{name: s-{ns}-{pod}, namespace: {ns}}}\n\
                 spec:\n  selector: {{pod: {pod}}}\n  ports:\n  - {{name: t, port: 8080, targetPort: serve-80-tcp}}\n  - {{name: u, port: 81, protocol: UDP}}\n  - {{name: s, port: 82, protocol: SCTP}}\n"
            ));
        }
    }
    std::fs::write(&dir, yaml).unwrap();
    lab.ok(&["apply", "-f", dir.to_str().unwrap()]);
    for via in ["pod", "service"] {
        let v = lab.json(&["probe", "--json", "--via", via]);
        let probes = v["probes"].as_array().unwrap();
        // 4 pods: 12 ordered pairs × 3 ports
        assert_eq!(probes.len(), 36, "{v}");
        for p in probes {
            assert_eq!(p["connected"], true, "{p}");
            assert_eq!(p["via"], via);
        }
        let protos: BTreeSet<&str> = probes
            .iter()
            .map(|p| p["protocol"].as_str().unwrap())
            .collect();
        assert_eq!(protos, ["SCTP", "TCP", "UDP"].into());
        if via == "service" {
            assert!(
                probes
                    .iter()
                    .all(|p| p["to_ip"].as_str().unwrap().starts_with("10.96."))
            );
            assert!(
                probes
                    .iter()
                    .any(|p| p["service_port"] == 8080 && p["port"] == 80)
            );
        }
    }
    // the truth table notation
    let text = lab.ok(&["probe", "--port", "serve-82-sctp"]);
    assert!(text.contains("SCTP/82 via pod:"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["x/a", "-", ".", ".", "."]),
        "{text}"
    );
    // a port nobody serves is refused, for each protocol
    for proto in ["TCP", "UDP", "SCTP"] {
        assert!(!lab.connected(&[
            "--from",
            "x/a",
            "--to",
            "y/b",
            "--port",
            "7981",
            "--protocol",
            proto
        ]));
    }
    assert!(lab.connected(&["--from", "node/node-2", "--to", "x/a", "--port", "80"]));
    assert!(lab.connected(&[
        "--from",
        "node/node-1",
        "--to",
        "x/b",
        "--port",
        "81",
        "--via",
        "service"
    ]));
    assert!(lab.connected(&["--from", "ext", "--to", "y/a", "--port", "serve-81-udp"]));
    assert!(lab.connected(&[
        "--from",
        "x/a",
        "--to",
        "ext",
        "--port",
        "443",
        "--protocol",
        "TCP"
    ]));
    assert!(lab.connected(&[
        "--from",
        "x/a",
        "--to",
        "ext",
        "--port",
        "53",
        "--protocol",
        "UDP"
    ]));
    lab.ok(&["down"]);
    let _ = std::fs::remove_file(dir);
    assert_eq!(remains(&lab.prefix), Vec::<String>::new());
}

/// The whole command line with the real agent on the example manifests; then `down` leaves no
/// network namespace, link, pin or process behind.
#[test]
fn lab_commands_enforce_policy_and_down_leaves_nothing() {
    require_root();
    let lab = LabGuard {
        prefix: prefix('e'),
    };
    let links_before = root_links();
    let up = lab.ok(&["up", "--nodes", "2"]);
    assert!(up.contains("enforced by 2/2 agents"), "{up}");
    let (cluster, app) = examples();
    let out = lab.ok(&["apply", "-f", &cluster, "-f", &app]);
    assert!(
        out.contains("networkpolicy/shop/default-deny-all created"),
        "{out}"
    );
    assert!(out.contains("enforced by 2/2 agents in"), "{out}");
    // Re-applying is a no-op.
    assert!(lab.ok(&["apply", "-f", &app]).contains("nothing changed"));

    let pods = lab.json(&["get", "pods", "-o", "json"]);
    let items = pods["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    for p in items {
        assert!(
            p["spec"]["nodeName"].as_str().unwrap().starts_with("node-"),
            "{p}"
        );
        assert!(
            p["status"]["podIP"]
                .as_str()
                .unwrap()
                .starts_with("10.244."),
            "{p}"
        );
        assert!(
            p["status"]["hostIP"]
                .as_str()
                .unwrap()
                .starts_with("172.18.0."),
            "{p}"
        );
    }
    let ns = lab.json(&["get", "namespaces", "-o", "json"]);
    assert!(
        ns["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["metadata"]["labels"]["kubernetes.io/metadata.name"] == "shop")
    );
    let svcs = lab.json(&["get", "services", "-o", "json"]);
    assert!(
        svcs["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["spec"]["clusterIP"] == "10.96.0.10")
    );
    let netpols = lab.json(&["get", "networkpolicies", "-o", "json"]);
    assert_eq!(netpols["items"].as_array().unwrap().len(), 5);
    // An IPv4 lab has no IPv6 addresses to dial: an error that says so.
    let out = lab.run(&["probe", "--family", "6"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("this lab has no IPv6 addresses"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The chain is open, everything else in `shop` is closed, via pod IPs and Services.
    for via in ["pod", "service"] {
        assert!(lab.connected(&[
            "--from",
            "shop/frontend",
            "--to",
            "shop/backend",
            "--port",
            "http",
            "--via",
            via
        ]));
        assert!(lab.connected(&[
            "--from",
            "shop/backend",
            "--to",
            "shop/database",
            "--port",
            "postgres",
            "--via",
            via
        ]));
        assert!(!lab.connected(&[
            "--from",
            "shop/frontend",
            "--to",
            "shop/database",
            "--port",
            "5432",
            "--via",
            via
        ]));
        assert!(!lab.connected(&[
            "--from",
            "default/debug",
            "--to",
            "shop/backend",
            "--port",
            "8080",
            "--via",
            via
        ]));
        assert!(lab.connected(&[
            "--from",
            "shop/database",
            "--to",
            "kube-system/coredns",
            "--port",
            "dns",
            "--via",
            via
        ]));
    }
    assert!(lab.connected(&["--from", "ext", "--to", "shop/frontend", "--port", "8080"]));
    assert!(!lab.connected(&["--from", "ext", "--to", "shop/backend", "--port", "8080"]));
    assert!(!lab.connected(&[
        "--from",
        "shop/frontend",
        "--to",
        "ext",
        "--port",
        "443",
        "--protocol",
        "TCP"
    ]));
    // the pod's own node always gets in (kubelet probes)
    let backend_node = items
        .iter()
        .find(|p| p["metadata"]["name"] == "backend")
        .map(|p| p["spec"]["nodeName"].as_str().unwrap().to_string())
        .unwrap();
    assert!(lab.connected(&[
        "--from",
        &format!("node/{backend_node}"),
        "--to",
        "shop/backend",
        "--port",
        "8080"
    ]));

    // `kubectl netpol --lab` reads this lab and agrees, cell for cell, with what the real
    // dataplane did: the probe's truth tables are the expectation file.
    let observed = lab.ok(&["probe", "--timeout-ms", "500"]);
    let expect = std::env::temp_dir().join(format!("{}-observed.txt", lab.prefix));
    std::fs::write(&expect, &observed).unwrap();
    let out = netpol(&[
        "--lab",
        &lab.prefix,
        "test",
        "--expect",
        &expect.display().to_string(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cells: usize = text
        .split('/')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("a cell count: {text}"));
    assert!(cells >= 20, "every pair judged: {text}");
    let explain = netpol(&[
        "--lab",
        &lab.prefix,
        "explain",
        "--from",
        "shop/frontend",
        "--to",
        "shop/database",
        "--port",
        "5432",
        "-o",
        "json",
    ]);
    assert_eq!(explain.status.code(), Some(1), "a denied flow exits 1");
    let v: Value = serde_json::from_slice(&explain.stdout).unwrap();
    assert_eq!(v["allowed"], false, "{v}");
    assert_eq!(
        v["ingress"]["policies"],
        serde_json::json!(["shop/database", "shop/default-deny-all"]),
        "{v}"
    );

    // Relabel in place: the database becomes a frontend and may call the backend, keeping its IP.
    let db_ip = |v: &Value| {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["metadata"]["name"] == "database")
            .unwrap()["status"]["podIP"]
            .clone()
    };
    let ip_before = db_ip(&pods);
    let pods_yaml = std::fs::read_to_string(format!("{app}/10-shop-pods.yaml")).unwrap();
    let db_doc = pods_yaml
        .split("\n---\n")
        .find(|d| d.contains("name: database") && d.contains("kind: Pod"))
        .unwrap();
    assert!(db_doc.contains("labels: {app: database, tier: data}"));
    let relabel = std::env::temp_dir().join(format!("{}-relabel.yaml", lab.prefix));
    for (labels, connected) in [
        ("{app: frontend, tier: data}", true),
        ("{app: database, tier: data}", false),
    ] {
        std::fs::write(
            &relabel,
            db_doc.replace("{app: database, tier: data}", labels),
        )
        .unwrap();
        let out = lab.ok(&["apply", "-f", relabel.to_str().unwrap()]);
        assert!(
            out.contains("pod/shop/database configured (relabelled in place)"),
            "{out}"
        );
        assert_eq!(
            lab.connected(&[
                "--from",
                "shop/database",
                "--to",
                "shop/backend",
                "--port",
                "8080"
            ]),
            connected
        );
    }
    assert_eq!(db_ip(&lab.json(&["get", "pods", "-o", "json"])), ip_before);

    // An invalid file changes nothing and names file, object and field.
    let bad = std::env::temp_dir().join(format!("{}-bad.yaml", lab.prefix));
    std::fs::write(
        &bad,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: ok, namespace: shop}\nspec: {podSelector: {}}\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: broken, namespace: shop}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: 80, endPort: 70}]}]\n",
    )
    .unwrap();
    let out = lab.run(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml (document 2)")
            && err.contains("networkpolicy/shop/broken")
            && err.contains("spec.ingress[0].ports[0].endPort"),
        "{err}"
    );
    assert_eq!(
        lab.json(&["get", "networkpolicies", "-o", "json"])["items"]
            .as_array()
            .unwrap()
            .len(),
        5
    );

    // Deleting the policies opens everything again.
    let out = lab.ok(&["delete", "-f", &format!("{app}/20-network-policies.yaml")]);
    assert!(
        out.contains("networkpolicy/shop/default-deny-all deleted"),
        "{out}"
    );
    assert!(lab.connected(&[
        "--from",
        "default/debug",
        "--to",
        "shop/database",
        "--port",
        "5432",
        "--via",
        "service"
    ]));

    lab.ok(&["down"]);
    for f in [relabel, bad] {
        let _ = std::fs::remove_file(f);
    }
    assert_eq!(remains(&lab.prefix), Vec::<String>::new());
    assert_eq!(
        root_links(),
        links_before,
        "links appeared in the root network namespace"
    );
}

/// `down` finds everything even when the lab's state is lost (a crash mid-command).
#[test]
fn down_cleans_up_after_a_crash() {
    require_root();
    let lab = LabGuard {
        prefix: prefix('c'),
    };
    lab.ok(&["up", "--nodes", "2"]);
    let (cluster, _) = examples();
    lab.ok(&["apply", "-f", &cluster]);
    assert!(!remains(&lab.prefix).is_empty());
    std::fs::remove_dir_all(state_dir(&lab.prefix)).unwrap();
    let out = lab.ok(&["down"]);
    assert!(out.contains("is down"), "{out}");
    assert_eq!(remains(&lab.prefix), Vec::<String>::new());
}

/// Audit mode on the real dataplane: an audited default deny blocks nothing and reports each flow
/// it would drop, naming the policy; without the annotation it denies exactly those flows.
#[test]
fn an_audited_policy_blocks_nothing_and_reports_what_it_would_drop() {
    require_root();
    let lab = LabGuard {
        prefix: prefix('a'),
    };
    lab.ok(&["up", "--nodes", "2"]);
    let dir = tempfile_dir("audit");
    let pods = dir.join("pods.yaml");
    let mut text = String::new();
    for name in ["a", "b"] {
        text.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{pod: {name}}}}}\n\
             spec: {{nodeName: node-{n}, containers: [{{name: c, ports: [{{containerPort: 80}}]}}]}}\n---\n",
            n = if name == "a" { 1 } else { 2 }
        ));
    }
    std::fs::write(&pods, text).unwrap();
    let policy = |audit: bool| {
        let path = dir.join(format!("deny-{audit}.yaml"));
        let annotations = if audit {
            ", annotations: {policy-agent/audit: \"true\"}"
        } else {
            ""
        };
        std::fs::write(
            &path,
            format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                 metadata: {{name: deny, namespace: x{annotations}}}\n\
                 spec: {{podSelector: {{matchLabels: {{pod: b}}}}, policyTypes: [Ingress]}}\n"
            ),
        )
        .unwrap();
        path.to_str().unwrap().to_string()
    };
    let pods = pods.to_str().unwrap().to_string();
    lab.ok(&["apply", "-f", &pods, "-f", &policy(true)]);
    let a_to_b = ["--from", "x/a", "--to", "x/b", "--port", "80"];
    let b_to_a = ["--from", "x/b", "--to", "x/a", "--port", "80"];
    assert!(lab.connected(&a_to_b), "audit must not enforce");
    assert!(lab.connected(&b_to_a));
    // The report: node-2's agent (x/b's node) names the policy for x/a → x/b, and only that flow.
    let log_of = |node: &str| {
        std::fs::read_to_string(state_dir(&lab.prefix).join(format!("logs/agent-{node}.log")))
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let would_drop = loop {
        let lines: Vec<String> = log_of("node-2")
            .lines()
            .filter(|l| l.contains("would-drop"))
            .map(str::to_string)
            .collect();
        if !lines.is_empty() || std::time::Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(
        !would_drop.is_empty(),
        "no would-drop line:\n{}",
        log_of("node-2")
    );
    for l in &would_drop {
        assert!(
            l.contains("x/deny") && l.contains("x/b") && l.contains("x/a"),
            "{l}"
        );
    }
    assert!(
        !log_of("node-1").contains("would-drop"),
        "x/b → x/a is not affected by the audited policy:\n{}",
        log_of("node-1")
    );
    let status = lab.ok(&["status"]);
    assert!(
        status.lines().any(
            |l| l.contains("audit_verdicts_total{verdict=\"would-drop\"}")
                && !l.trim_end().ends_with(" 0")
        ),
        "{status}"
    );
    // Enforced: exactly the reported flow is denied now.
    lab.ok(&["apply", "-f", &policy(false)]);
    assert!(
        !lab.connected(&a_to_b),
        "the enforced policy denies what audit reported"
    );
    assert!(lab.connected(&b_to_a));
}

fn tempfile_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("xtask-lab-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The rollout path on the real dataplane: the agents record the flows of the three-tier example
/// (`kubectl netpol flows`), `advise` turns them into policies, and once those are applied every
/// observed flow still connects while unobserved flows between the same pods do not — and the
/// drops are in the flow record.
#[test]
fn advice_from_recorded_flows_allows_exactly_the_observed_flows() {
    require_root();
    let lab = LabGuard {
        prefix: prefix('v'),
    };
    lab.ok(&["up", "--nodes", "2"]);
    let examples = root().join("deploy/examples");
    let path = |p: &str| examples.join(p).to_str().unwrap().to_string();
    lab.ok(&[
        "apply",
        "-f",
        &path("lab"),
        "-f",
        &path("00-namespaces.yaml"),
        "-f",
        &path("10-shop-pods.yaml"),
    ]);
    let observed: [&[&str]; 4] = [
        &[
            "--from",
            "shop/frontend",
            "--to",
            "shop/backend",
            "--port",
            "http",
            "--via",
            "service",
        ],
        &[
            "--from",
            "shop/backend",
            "--to",
            "shop/database",
            "--port",
            "postgres",
        ],
        &[
            "--from",
            "shop/frontend",
            "--to",
            "kube-system/coredns",
            "--port",
            "53",
            "--protocol",
            "UDP",
        ],
        &["--from", "ext", "--to", "shop/frontend", "--port", "http"],
    ];
    let unobserved: [&[&str]; 5] = [
        &[
            "--from",
            "shop/backend",
            "--to",
            "shop/frontend",
            "--port",
            "http",
        ],
        &[
            "--from",
            "shop/frontend",
            "--to",
            "shop/database",
            "--port",
            "postgres",
        ],
        &[
            "--from",
            "shop/database",
            "--to",
            "shop/backend",
            "--port",
            "http",
        ],
        &[
            "--from",
            "default/debug",
            "--to",
            "shop/frontend",
            "--port",
            "http",
        ],
        &["--from", "ext", "--to", "shop/backend", "--port", "http"],
    ];
    for probe in observed {
        assert!(lab.connected(probe), "no policy yet: {probe:?}");
    }
    let p = lab.prefix.as_str();
    // The record: both halves of frontend → backend (the ingress at backend, named by pod).
    let flows = netpol_until(
        &["--lab", p, "flows", "-o", "json", "--namespace", "shop"],
        |text| {
            text.lines().any(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                v["endpoint"] == "shop/backend"
                    && v["peer"] == "shop/frontend"
                    && v["direction"] == "ingress"
            })
        },
    );
    let records: Vec<Value> = flows
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        records.iter().any(|v| v["endpoint"] == "shop/backend"
            && v["peer"] == "shop/frontend"
            && v["verdict"] == "allowed"
            && v["dport"] == 8080),
        "frontend → backend recorded at backend:\n{flows}"
    );
    assert!(
        records
            .iter()
            .any(|v| v["endpoint"] == "shop/database" && v["peer"] == "shop/backend"),
        "{flows}"
    );
    assert!(
        records.iter().all(|v| v["verdict"] == "allowed"),
        "nothing dropped yet:\n{flows}"
    );
    let table = netpol(&["--lab", p, "flows", "--pod", "shop/database"]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.starts_with("TIME") && table.contains("shop/backend") && !table.contains("frontend"),
        "{table}"
    );

    // Advise from every recorded flow, apply, lint.
    let dir = tempfile_dir("advise");
    let all = netpol(&["--lab", p, "flows", "-o", "json"]);
    assert!(all.status.success());
    let flow_file = dir.join("flows.jsonl");
    std::fs::write(&flow_file, &all.stdout).unwrap();
    let advice = netpol(&["--lab", p, "advise", "--flows", flow_file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&advice.stderr);
    assert!(advice.status.success(), "advise: {stderr}");
    let yaml = String::from_utf8(advice.stdout).unwrap();
    eprintln!("advice:\n{yaml}\n{stderr}");
    for name in ["advised-frontend", "advised-backend", "advised-database"] {
        assert!(yaml.contains(name), "{name}:\n{yaml}\n{stderr}");
    }
    assert!(
        !yaml.contains("advised-kube-dns"),
        "kube-system is advised only when asked for:\n{yaml}"
    );
    assert!(
        !yaml.contains("10.244."),
        "peers by selector, never by pod IP:\n{yaml}"
    );
    let advice_file = dir.join("advice.yaml");
    std::fs::write(&advice_file, &yaml).unwrap();
    lab.ok(&["apply", "-f", advice_file.to_str().unwrap()]);
    let lint = netpol(&["--lab", p, "lint"]);
    assert!(
        lint.status.success(),
        "the advice lints clean:\n{}",
        String::from_utf8_lossy(&lint.stdout)
    );
    for probe in observed {
        assert!(lab.connected(probe), "observed, so advised: {probe:?}");
    }
    for probe in unobserved {
        assert!(
            !lab.connected(probe),
            "never observed, so denied: {probe:?}"
        );
    }
    // explain --live: the kernel maps of the nodes hosting the ends agree with the evaluator,
    // and with what the probes saw.
    for (from, to, port, connected) in [
        ("shop/frontend", "shop/backend", "8080", true),
        ("shop/backend", "shop/database", "5432", true),
        ("shop/backend", "shop/frontend", "8080", false),
        ("shop/frontend", "shop/database", "5432", false),
        ("default/debug", "shop/frontend", "8080", false),
    ] {
        let out = netpol(&[
            "--lab", p, "explain", "--live", "--from", from, "--to", to, "--port", port, "-o",
            "json",
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{e}: {text}{}", String::from_utf8_lossy(&out.stderr)));
        let directions: Vec<&Value> = v[0]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|n| n["directions"].as_array().unwrap())
            .collect();
        // Both ends are pods with an endpoint: one direction each (default/debug too).
        assert_eq!(directions.len(), 2, "{from} -> {to}: {text}");
        for d in &directions {
            assert_eq!(d["agrees"], true, "{from} -> {to}: {text}");
        }
        let allowed = directions.iter().all(|d| d["kernel"]["allowed"] == true);
        assert_eq!(allowed, connected, "{from} -> {to}: {text}");
        assert_eq!(out.status.success(), connected, "exit code: {text}");
    }
    // The drops are recorded too.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = netpol(&[
            "--lab",
            p,
            "flows",
            "-o",
            "json",
            "--verdict",
            "dropped",
            "--pod",
            "shop/database",
        ]);
        let text = String::from_utf8(out.stdout).unwrap();
        if text.lines().any(|l| l.contains("shop/frontend")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "frontend → database drop not recorded:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Pods a and c on node-1, b on node-2, each serving http (TCP 80) and UDP 81, and a Service
/// for b.
fn dual_pods() -> String {
    let pod = |name: &str, node: u32| {
        format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: d, labels: {{app: {name}}}}}
spec: {{nodeName: node-{node}, containers: [{{name: c, image: agnhost, ports: [{{containerPort: 80, name: http}}, {{containerPort: 81, protocol: UDP}}]}}]}}
---
"
        )
    };
    pod("a", 1)
        + &pod("b", 2)
        + &pod("c", 1)
        + "apiVersion: v1
kind: Service
metadata: {name: b, namespace: d}
spec: {selector: {app: b}, ports: [{name: http, port: 8080, targetPort: http}, {name: udp, port: 81, protocol: UDP}]}
"
}

/// A policy on d/b: ingress from `from` (peers, as YAML flow), on `ports` (YAML flow), and no
/// egress at all (replies still flow: they belong to allowed connections).
fn policy_on_b(from: &str, ports: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: on-b, namespace: d}}
spec:
  podSelector: {{matchLabels: {{app: b}}}}
  policyTypes: [Ingress, Egress]
  ingress: [{{from: {from}, ports: {ports}}}]
"
    )
}

/// One connection per (family, via) from `from` to d/b on `port`: connected or not, in the order
/// IPv4 pod, IPv4 service, IPv6 pod, IPv6 service.
fn to_b(lab: &LabGuard, from: &str, port: &str) -> [bool; 4] {
    let mut out = [false; 4];
    let mut i = 0;
    for family in ["4", "6"] {
        for via in ["pod", "service"] {
            out[i] = lab.connected(&[
                "--from", from, "--to", "d/b", "--port", port, "--family", family, "--via", via,
            ]);
            i += 1;
        }
    }
    out
}

/// A dual-stack lab: every pod has an address of each family and every Service a ClusterIP of
/// each; an ipBlock of one family never matches the other; a pod's identity, named ports,
/// conntrack and revocation are the same whichever family a peer uses; node traffic from the
/// node's IPv6 address is node traffic.
#[test]
fn dual_stack_enforces_each_family_with_one_identity() {
    require_root();
    let lab = LabGuard {
        prefix: prefix('d'),
    };
    lab.ok(&["up", "--nodes", "2", "--ip-family", "dual"]);
    let dir = tempfile_dir("dual");
    let pods = dir.join("pods.yaml");
    std::fs::write(&pods, dual_pods()).unwrap();
    lab.ok(&["apply", "-f", pods.to_str().unwrap()]);

    let got = lab.json(&["get", "pods", "-o", "json"]);
    let ips = |name: &str| -> Vec<String> {
        let p = got["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["metadata"]["name"] == name)
            .unwrap();
        p["status"]["podIPs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["ip"].as_str().unwrap().to_string())
            .collect()
    };
    let a = ips("a");
    assert_eq!(a.len(), 2, "{a:?}");
    assert!(a[0].starts_with("10.244.1."), "IPv4 first: {a:?}");
    assert!(a[1].starts_with("fd00:10:244:1::"), "{a:?}");
    let svc = lab.json(&["get", "services", "-o", "json"]);
    let spec = &svc["items"][0]["spec"];
    assert_eq!(spec["ipFamilyPolicy"], "PreferDualStack", "{spec}");
    assert_eq!(
        spec["ipFamilies"],
        serde_json::json!(["IPv4", "IPv6"]),
        "{spec}"
    );
    // A probe's `to_ip` is the address of the family asked for.
    let v = lab.json(&[
        "probe", "--json", "--from", "d/a", "--to", "d/b", "--port", "80", "--family", "6",
    ]);
    assert_eq!(v["probes"][0]["to_ip"], ips("b")[1], "{v}");
    assert_eq!(to_b(&lab, "d/a", "80"), [true; 4]);

    let policy = dir.join("policy.yaml");
    let apply = |text: String| {
        std::fs::write(&policy, text).unwrap();
        lab.ok(&["apply", "-f", policy.to_str().unwrap()]);
    };
    // An IPv4 block admits a's IPv4 address only; an IPv6 block its IPv6 address only; the
    // "everything" block of one family admits nothing of the other.
    apply(policy_on_b(
        &format!("[{{ipBlock: {{cidr: {}/32}}}}]", a[0]),
        "[{port: 80}]",
    ));
    assert_eq!(to_b(&lab, "d/a", "80"), [true, true, false, false]);
    apply(policy_on_b(
        &format!("[{{ipBlock: {{cidr: \"{}/128\"}}}}]", a[1]),
        "[{port: 80}]",
    ));
    assert_eq!(to_b(&lab, "d/a", "80"), [false, false, true, true]);
    apply(policy_on_b(
        "[{ipBlock: {cidr: 0.0.0.0/0}}]",
        "[{port: 80}]",
    ));
    assert_eq!(to_b(&lab, "d/a", "80"), [true, true, false, false]);
    apply(policy_on_b("[{ipBlock: {cidr: \"::/0\"}}]", "[{port: 80}]"));
    assert_eq!(to_b(&lab, "d/a", "80"), [false, false, true, true]);

    // One identity whichever address the peer uses; a named port in both families; the
    // replies of b, which may send nothing of its own, pass by conntrack in both.
    apply(policy_on_b(
        "[{podSelector: {matchLabels: {app: a}}}]",
        "[{port: http}, {port: 81, protocol: UDP}]",
    ));
    assert_eq!(to_b(&lab, "d/a", "80"), [true; 4]);
    assert_eq!(to_b(&lab, "d/a", "81"), [true; 4]);
    assert_eq!(to_b(&lab, "d/c", "80"), [false; 4]);
    assert!(!lab.connected(&[
        "--from", "d/b", "--to", "d/a", "--port", "80", "--family", "6"
    ]));

    // Revocation per family: a UDP flow of each family, allowed and answered, is cut once the
    // policy no longer allows it.
    let netns = pod_netns(&lab.prefix, "d/a");
    let b = ips("b");
    let sockets: Vec<std::net::UdpSocket> = b
        .iter()
        .map(|ip| {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            in_netns(&netns, move || {
                let any: std::net::IpAddr = if ip.is_ipv4() {
                    std::net::Ipv4Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                };
                let s = std::net::UdpSocket::bind((any, 0)).unwrap();
                s.connect((ip, 81)).unwrap();
                s.set_read_timeout(Some(std::time::Duration::from_millis(500)))
                    .unwrap();
                s
            })
        })
        .collect();
    let echoed = |s: &std::net::UdpSocket| {
        let mut buf = [0u8; 64];
        s.send(b"ping").unwrap();
        s.recv(&mut buf).is_ok()
    };
    assert!(sockets.iter().all(echoed), "both flows are answered");
    apply(policy_on_b(
        "[{podSelector: {matchLabels: {app: a}}}]",
        "[{port: http}]",
    ));
    for (s, ip) in sockets.iter().zip(&b) {
        assert!(
            !echoed(s),
            "the flow to {ip}:81 outlived the policy that allowed it"
        );
    }
    assert_eq!(to_b(&lab, "d/a", "80"), [true; 4]);

    // Node traffic: b's own node reaches it from its IPv4 and its IPv6 address; the other node
    // does not (it is no peer the policy allows).
    for family in ["4", "6"] {
        assert!(lab.connected(&[
            "--from",
            "node/node-2",
            "--to",
            "d/b",
            "--port",
            "80",
            "--family",
            family,
        ]));
        assert!(!lab.connected(&[
            "--from",
            "node/node-1",
            "--to",
            "d/b",
            "--port",
            "80",
            "--family",
            family,
        ]));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// One script over the lab's command line, unchanged, in each family: `LAB_IP_FAMILY` alone
/// switches the lab, and the verdicts are the ones the policies imply in each.
#[test]
fn an_unchanged_script_gets_the_policies_verdicts_in_every_family() {
    require_root();
    let script = root().join("xtask/tests/scripts/verdicts.sh");
    for (family, tag) in [("ipv4", '4'), ("ipv6", '6'), ("dual", 'b')] {
        let lab = LabGuard {
            prefix: prefix(tag),
        };
        let out = std::process::Command::new("sh")
            .arg(&script)
            .current_dir(root())
            .env("XTASK", XTASK)
            .env("LAB_PREFIX", &lab.prefix)
            .env("LAB_IP_FAMILY", family)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        eprintln!("{family}:\n{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{family}: {text}");
        assert_eq!(
            text.lines().filter(|l| l.starts_with("ok   ")).count(),
            16,
            "{text}"
        );
        assert!(
            text.contains("every verdict as the policies imply"),
            "{text}"
        );
        // The lab really ran in that family: the address the script learned is of it.
        let client = text
            .lines()
            .find_map(|l| l.strip_prefix("client address: "))
            .unwrap_or_default();
        let v6: bool = client.parse::<std::net::IpAddr>().unwrap().is_ipv6();
        assert_eq!(v6, family == "ipv6", "{family}: {client}");
        assert!(
            remains(&lab.prefix).is_empty(),
            "{:?}",
            remains(&lab.prefix)
        );
    }
}
