//! The agent's Kubernetes source against a real API server: the lab in its real-API mode
//! (`lab up --api kube`: etcd, kube-apiserver, kube-controller-manager and kube-proxy built from
//! the pinned Go modules by `cargo xtask setup`). Needs root and the built binaries; fails
//! without them. Each test uses its own lab prefix and tears its lab down even when it fails.

mod common;

use common::*;

const APP: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: x}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec: {nodeName: node-1, containers: [{name: c, image: agnhost, ports: [{containerPort: 80, name: http}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {pod: b}}
spec: {nodeName: node-2, containers: [{name: c, image: agnhost, ports: [{containerPort: 80, name: http}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: x}
spec: {selector: {pod: b}, ports: [{name: web, port: 8080, targetPort: http}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress]}
";

const ALLOW: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: a}}}], ports: [{port: http}]}]
";

fn write(lab: &LabGuard, name: &str, text: &str) -> String {
    let path = std::env::temp_dir().join(format!("{}-{name}.yaml", lab.prefix));
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Both ways a to b: (pod IP, ClusterIP through the real kube-proxy).
fn a_to_b(lab: &LabGuard) -> (bool, bool) {
    let pod = lab.connected(&["--from", "x/a", "--to", "x/b", "--port", "80"]);
    let svc = lab.connected(&[
        "--from", "x/a", "--to", "x/b", "--port", "80", "--via", "service",
    ]);
    (pod, svc)
}

/// `lab status` once `done` holds for it, or a failure showing the last status after 60 s.
fn status_until(lab: &LabGuard, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let status = lab.ok(&["status"]);
        if done(&status) {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the status never got there in 60 s: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Every agent's value of a metric, from `lab status`.
fn metric(status: &str, name: &str) -> Vec<f64> {
    status
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix(name)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn agent_pids(lab: &LabGuard) -> Vec<i32> {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_dir(&lab.prefix).join("state.json")).unwrap())
            .unwrap();
    state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["agent_pid"].as_i64().unwrap() as i32)
        .collect()
}

fn signal(pids: &[i32], sig: i32) {
    for &p in pids {
        // SAFETY: plain syscall on processes this lab started.
        assert_eq!(unsafe { libc::kill(p, sig) }, 0, "signal {sig} to {p}");
    }
}

/// Kubernetes source end to end: converges through kubectl, keeps enforcing while the API server
/// is down and says so, converges after it returns, and re-lists after a restart with a
/// compacted history (410 Gone) without losing a change it missed.
#[test]
fn agents_follow_the_real_api_server_through_restart_outage_and_compaction() {
    require_root();
    let lab = LabGuard {
        prefix: prefix('k'),
    };
    let up = lab.ok(&["up", "--api", "kube"]);
    assert!(up.contains("kube-apiserver v1.34"), "{up}");
    lab.ok(&["apply", "-f", &write(&lab, "app", APP)]);
    assert_eq!(a_to_b(&lab), (false, false), "default deny");
    let allow = write(&lab, "allow", ALLOW);
    lab.ok(&["apply", "-f", &allow]);
    assert_eq!(a_to_b(&lab), (true, true), "allowed by the named port");
    // The EndpointSlice is the real controller's.
    let slices = lab.ok(&["kubectl", "get", "endpointslices", "-n", "x", "-o", "json"]);
    assert!(
        slices.contains("endpointslice-controller.k8s.io"),
        "{slices}"
    );

    // API server down: enforcement unchanged; readyz, status and metrics say why.
    lab.ok(&["control-plane", "stop", "kube-apiserver"]);
    let status = status_until(&lab, |s| {
        let errors = metric(s, "policy_agent_source_errors");
        !errors.is_empty() && errors.iter().all(|v| *v > 0.0)
    });
    assert!(
        status.contains("readyz: 503 source unavailable, the last state stays enforced"),
        "{status}"
    );
    assert_eq!(a_to_b(&lab), (true, true), "the last state stays enforced");
    let other = lab.connected(&["--from", "x/b", "--to", "x/a", "--port", "80"]);
    assert!(!other, "and so does the deny");

    // Back: converges again, and a new change is enforced.
    lab.ok(&["control-plane", "start", "kube-apiserver"]);
    lab.ok(&["delete", "-f", &allow]);
    assert_eq!(a_to_b(&lab), (false, false));
    // Every watch of every agent reconnects on its own backoff; the change above may arrive
    // through one watch while another is still waiting.
    let status = status_until(&lab, |s| {
        metric(s, "policy_agent_source_errors")
            .iter()
            .all(|v| *v == 0.0)
            && s.matches("readyz: 200 ready").count() == 2
    });

    // A change the agents miss: frozen, they lose their watches to an API server restart; the
    // change is made on the next API server, the history compacted, and the API server
    // restarted once more (an empty watch cache). Their watches resume from a resourceVersion
    // that is gone (410 Gone) and they re-list.
    let lists_before = metric(&status, "policy_agent_source_lists_total");
    let pids = agent_pids(&lab);
    signal(&pids, libc::SIGSTOP);
    let steps: Vec<Vec<&str>> = vec![
        vec!["control-plane", "stop", "kube-apiserver"],
        vec!["control-plane", "start", "kube-apiserver"],
        vec!["kubectl", "apply", "-f", &allow],
        vec!["compact-etcd"],
        vec!["control-plane", "stop", "kube-apiserver"],
        vec!["control-plane", "start", "kube-apiserver"],
    ];
    let outs: Vec<_> = steps.iter().map(|a| lab.run(a)).collect();
    signal(&pids, libc::SIGCONT);
    for out in outs {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    lab.ok(&["wait"]);
    assert_eq!(
        a_to_b(&lab),
        (true, true),
        "the missed change is enforced after the re-list"
    );
    let lists_after = metric(&lab.ok(&["status"]), "policy_agent_source_lists_total");
    assert_eq!(lists_before.len(), lists_after.len());
    for (b, a) in lists_before.iter().zip(&lists_after) {
        assert!(
            a > b,
            "every agent re-listed: {lists_before:?} -> {lists_after:?}"
        );
    }
}

/// An agent whose ClusterRole lacks a verb never enforces a partial view and says which
/// resource and verb it was refused.
#[test]
fn missing_permission_fails_loudly() {
    require_root();
    let lab = LabGuard {
        prefix: prefix('r'),
    };
    let rbac = std::fs::read_to_string(root().join("deploy/base/rbac.yaml")).unwrap();
    let narrowed = rbac.replace(
        "    resources: [endpointslices]\n    verbs: [get, list, watch]",
        "    resources: [endpointslices]\n    verbs: [get]",
    );
    assert_ne!(
        rbac, narrowed,
        "the shipped role grants list on endpointslices"
    );
    let file = write(&lab, "rbac", &narrowed);
    let out = std::process::Command::new(XTASK)
        .current_dir(root())
        .env("LAB_AGENT_RBAC", &file)
        .env("LAB_CONVERGE_TIMEOUT_S", "20")
        .args(["lab", "--prefix", &lab.prefix, "up", "--api", "kube"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(!out.status.success(), "the lab must not come up");
    assert!(
        text.contains("endpointslices") && text.contains("cannot list"),
        "names resource and verb: {text}"
    );
    assert!(text.contains("forbidden"), "{text}");
}

/// The k3s shape: pods on flannel's `cni0` bridge (the real bridge plugin), found by the agent
/// through the pods' network namespaces, Services through the real kube-proxy in nftables mode.
#[test]
fn bridge_cni_and_nftables_kube_proxy() {
    require_root();
    let lab = LabGuard {
        prefix: prefix('b'),
    };
    lab.ok(&[
        "up",
        "--api",
        "kube",
        "--cni",
        "bridge",
        "--kube-proxy",
        "nftables",
    ]);
    lab.ok(&["apply", "-f", &write(&lab, "app", APP)]);
    assert_eq!(a_to_b(&lab), (false, false), "default deny");
    lab.ok(&["apply", "-f", &write(&lab, "allow", ALLOW)]);
    assert_eq!(a_to_b(&lab), (true, true), "allowed by the named port");
    assert!(!lab.connected(&["--from", "x/b", "--to", "x/a", "--port", "80"]));
    // `kubectl netpol --lab` reads the same state from the lab's API server.
    for (from, to, allowed) in [("x/a", "x/b", true), ("x/b", "x/a", false)] {
        let out = netpol(&[
            "--lab",
            &lab.prefix,
            "explain",
            "--from",
            from,
            "--to",
            to,
            "--port",
            "80",
            "-o",
            "json",
        ]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(v["allowed"], allowed, "{from} -> {to}: {v}");
    }
    // The pods really hang off cni0.
    let links = std::process::Command::new("ip")
        .args([
            "-n",
            &format!("{}-node-1", lab.prefix),
            "-o",
            "link",
            "show",
            "master",
            "cni0",
        ])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert_eq!(
        links.lines().count(),
        1,
        "one pod port on node-1's cni0: {links}"
    );
}

/// Audit mode, the flow record and `explain --live` with the state in the real API server: an
/// audited deny blocks nothing, the record of the flow it would drop names it (read back with
/// `kubectl netpol flows`), the kernel maps explain the flow as the evaluator does, and once the
/// annotation is gone the flow is denied.
#[test]
fn audit_flows_and_live_explain_through_the_real_api_server() {
    require_root();
    let lab = LabGuard {
        prefix: prefix('u'),
    };
    lab.ok(&["up", "--api", "kube"]);
    let app = APP.replace(
        "metadata: {name: deny-all, namespace: x}",
        "metadata: {name: deny-all, namespace: x, annotations: {policy-agent/audit: \"true\"}}",
    );
    lab.ok(&["apply", "-f", &write(&lab, "audited", &app)]);
    assert_eq!(a_to_b(&lab), (true, true), "audit must not enforce");
    let p = lab.prefix.as_str();
    let flows = netpol_until(
        &["--lab", p, "flows", "-o", "json", "--verdict", "would-drop"],
        |text| !text.is_empty(),
    );
    let records: Vec<serde_json::Value> = flows
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        records.iter().any(|r| r["endpoint"] == "x/b"
            && r["peer"] == "x/a"
            && r["node"] == "node-2"
            && r["verdict"] == "allowed"
            && r["audit"]["policy"] == "x/deny-all"),
        "the would-drop of x/a -> x/b, recorded at x/b:\n{flows}"
    );
    let live = |want: bool| {
        let out = netpol(&[
            "--lab", p, "explain", "--live", "--from", "x/a", "--to", "x/b", "--port", "80", "-o",
            "json",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{e}: {text}{}", String::from_utf8_lossy(&out.stderr)));
        let directions: Vec<serde_json::Value> = v[0]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|n| n["directions"].as_array().unwrap().clone())
            .collect();
        assert_eq!(directions.len(), 2, "{text}");
        assert!(directions.iter().all(|d| d["agrees"] == true), "{text}");
        let ingress = directions
            .iter()
            .find(|d| d["direction"] == "ingress")
            .unwrap();
        assert_eq!(ingress["kernel"]["allowed"], want, "{text}");
    };
    live(true);
    lab.ok(&["apply", "-f", &write(&lab, "enforced", APP)]);
    assert_eq!(
        a_to_b(&lab),
        (false, false),
        "enforced once the annotation is gone"
    );
    live(false);
}
