//! The agent's Kubernetes source against a real API server: the lab in its real-API mode
//! (`lab up --api kube`: etcd, kube-apiserver, kube-controller-manager and kube-proxy built from
//! the pinned Go modules by `cargo xtask setup`). Needs root and the built binaries; fails
//! without them. Each test uses its own lab prefix and tears its lab down even when it fails.

mod common;

use common::*;
use serde_json::{Value, json};
use std::process::Command;

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

// ---- the chained CNI plugin: no window for a new pod ----------------------------------------

const WINDOW: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: w}
---
apiVersion: v1
kind: Namespace
metadata: {name: open}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-egress, namespace: w}
spec: {podSelector: {}, policyTypes: [Egress]}
";

/// Pods bound to node-1 that the lab does not run (created with `lab kubectl`, which starts
/// nothing): the test plays their runtime.
const WINDOW_PODS: &str = "
apiVersion: v1
kind: Pod
metadata: {name: quick, namespace: open}
spec: {nodeName: node-1, containers: [{name: c, image: agnhost}]}
---
apiVersion: v1
kind: Pod
metadata: {name: first, namespace: w}
spec: {nodeName: node-1, containers: [{name: c, image: agnhost}]}
---
apiVersion: v1
kind: Pod
metadata: {name: unchained, namespace: w}
spec: {nodeName: node-1, containers: [{name: c, image: agnhost}]}
";

/// One pod sandbox the test makes as containerd would: a network namespace, then the lab's CNI
/// chain for node-1 (`cni/node-1.conflist`, plugins from `cni/bin`), ADD plugin by plugin with
/// each result as the next one's `prevResult` (as libcni runs a list); DEL in reverse on drop.
struct Sandbox {
    state: std::path::PathBuf,
    node_ns: String,
    netns: String,
    pod: (String, String),
    list: Value,
    added: usize,
}

/// A plugin's outcome: success, stdout as JSON, how long it ran.
struct Ran {
    ok: bool,
    out: Value,
    took: std::time::Duration,
}

impl Sandbox {
    fn new(lab: &LabGuard, namespace: &str, name: &str, chained: bool) -> Self {
        let state = state_dir(&lab.prefix);
        let st: Value =
            serde_json::from_slice(&std::fs::read(state.join("state.json")).unwrap()).unwrap();
        let node_ns = st["nodes"][0]["netns"].as_str().unwrap().to_string();
        let mut list: Value = serde_json::from_slice(
            &std::fs::read(state.join("cni").join("node-1.conflist")).unwrap(),
        )
        .unwrap();
        let plugins = list["plugins"].as_array_mut().unwrap();
        assert_eq!(
            plugins.last().unwrap()["type"],
            "policy-agent-cni",
            "{plugins:?}"
        );
        if !chained {
            plugins.pop();
        }
        let netns = format!("{}-tpod-{name}", lab.prefix);
        let out = Command::new("ip")
            .args(["netns", "add", &netns])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        Self {
            state,
            node_ns,
            netns,
            pod: (namespace.into(), name.into()),
            list,
            added: 0,
        }
    }

    fn plugin(&self, i: usize, command: &str, prev: Option<&Value>) -> Ran {
        let mut conf = self.list["plugins"][i].clone();
        conf["cniVersion"] = self.list["cniVersion"].clone();
        conf["name"] = self.list["name"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let bin = self.state.join("cni").join("bin");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node_ns])
            .arg(bin.join(conf["type"].as_str().unwrap()))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("test-{}", self.netns))
            .env("CNI_NETNS", format!("/run/netns/{}", self.netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &bin)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                    self.pod.0, self.pod.1
                ),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&out.stdout);
        eprintln!(
            "CNI {command} {} for {}/{}: {} in {took:?}; {}{}",
            conf["type"],
            self.pod.0,
            self.pod.1,
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ran {
            ok: out.status.success(),
            out: serde_json::from_str(&text).unwrap_or(Value::Null),
            took,
        }
    }

    /// ADD through the chain; each plugin's outcome, stopping at the first failure.
    fn add(&mut self) -> Vec<Ran> {
        let mut prev: Option<Value> = None;
        let mut ran = Vec::new();
        for i in 0..self.list["plugins"].as_array().unwrap().len() {
            let r = self.plugin(i, "ADD", prev.as_ref());
            self.added = i + 1;
            let ok = r.ok;
            prev = Some(r.out.clone());
            ran.push(r);
            if !ok {
                break;
            }
        }
        ran
    }

    /// The address the chain gave the pod.
    fn ip(ran: &[Ran]) -> String {
        let a = ran[0].out["ips"][0]["address"].as_str().unwrap();
        a.split('/').next().unwrap().to_string()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for i in (0..self.added).rev() {
            let _ = self.plugin(i, "DEL", None);
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

/// Counts UDP datagrams reaching `ext` on `port`, per sender (the payload names it).
struct Receiver {
    counts: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Receiver {
    fn start(ext_ns: &str, port: u16) -> Self {
        let socket = in_netns(ext_ns, move || {
            let s = std::net::UdpSocket::bind(("0.0.0.0", port)).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_millis(50)))
                .unwrap();
            s
        });
        let counts = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, st) = (counts.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let tag = String::from_utf8_lossy(&buf[..n]);
                    let tag = tag.split(' ').next().unwrap_or_default().to_string();
                    *c.lock().unwrap().entry(tag).or_insert(0) += 1;
                }
            }
        });
        Self { counts, stop }
    }

    fn count(&self, tag: &str) -> u64 {
        self.counts.lock().unwrap().get(tag).copied().unwrap_or(0)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A UDP socket made in the pod's namespace before its network exists, so that it sends the
/// instant ADD returns.
fn pod_socket(netns: &str) -> std::net::UdpSocket {
    in_netns(netns, || std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap())
}

/// Sends `tag N` to ext:`port` every millisecond for `ms` milliseconds; how many left.
fn blast(socket: &std::net::UdpSocket, tag: &str, port: u16, ms: u64) -> u64 {
    let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
    let mut sent = 0;
    while std::time::Instant::now() < until {
        if socket
            .send_to(format!("{tag} {sent}").as_bytes(), ("203.0.113.10", port))
            .is_ok()
        {
            sent += 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    sent
}

#[test]
fn a_new_pod_sends_nothing_before_its_endpoint_is_enforced() {
    require_root();
    let lab = LabGuard {
        prefix: prefix('w'),
    };
    lab.ok(&["up", "--api", "kube", "--nodes", "1"]);
    lab.ok(&["apply", "-f", &write(&lab, "window", WINDOW)]);
    lab.ok(&[
        "kubectl",
        "create",
        "-f",
        &write(&lab, "window-pods", WINDOW_PODS),
    ]);
    let port = 40000 + (std::process::id() % 20000) as u16;
    let rx = Receiver::start(&format!("{}-ext", lab.prefix), port);
    let settle = || std::thread::sleep(std::time::Duration::from_millis(300));

    // Unrestricted: the chain adds only the agent's sync to the start, and traffic flows (the
    // receiver works).
    let mut quick = Sandbox::new(&lab, "open", "quick", true);
    let socket = pod_socket(&quick.netns);
    let ran = quick.add();
    assert!(ran.iter().all(|r| r.ok), "the chain failed for open/quick");
    let sent = blast(&socket, "quick", port, 500);
    settle();
    assert!(
        rx.count("quick") > 0,
        "nothing of {sent} reached ext from open/quick"
    );
    eprintln!(
        "figure: open/quick (no policy): ptp ADD {:?}, policy-agent-cni ADD {:?}; {} of {sent} \
         datagrams arrived",
        ran[0].took,
        ran[1].took,
        rx.count("quick")
    );

    // Default-deny egress, through the chain: nothing from the first instant on.
    let mut first = Sandbox::new(&lab, "w", "first", true);
    let socket = pod_socket(&first.netns);
    let ran = first.add();
    assert!(ran.iter().all(|r| r.ok), "the chain failed for w/first");
    let sent = blast(&socket, "first", port, 1000);
    settle();
    assert!(sent > 500, "the sender could not send: {sent}");
    assert_eq!(
        rx.count("first"),
        0,
        "w/first leaked {} of {sent} datagrams",
        rx.count("first")
    );
    eprintln!(
        "figure: w/first (default-deny egress, chained): 0 of {sent} datagrams passed; \
         policy-agent-cni ADD {:?}",
        ran[1].took
    );

    // The same without the chained plugin: the window the plugin closes. The agent cannot
    // know the pod until the API reports its address, so everything passes until then.
    let mut unchained = Sandbox::new(&lab, "w", "unchained", false);
    let socket = pod_socket(&unchained.netns);
    let ran = unchained.add();
    assert!(ran.iter().all(|r| r.ok) && ran.len() == 1);
    let sent = blast(&socket, "unchained", port, 500);
    settle();
    let leaked = rx.count("unchained");
    assert!(
        leaked > 0,
        "without the plugin the window should be open (0 of {sent} passed)"
    );
    let ip = Sandbox::ip(&ran);
    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
    lab.ok(&[
        "kubectl",
        "patch",
        "pod",
        "unchained",
        "-n",
        "w",
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
    // Once the status reaches the agent the pod is enforced: a quiet half second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let closed = loop {
        let before = rx.count("unchained");
        blast(&socket, "unchained", port, 500);
        settle();
        if rx.count("unchained") == before {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
    };
    assert!(
        closed,
        "w/unchained was never enforced after its status was written"
    );
    eprintln!(
        "figure: w/unchained (no plugin): {leaked} of {sent} datagrams passed before the API reported the pod"
    );

    // Fail closed: a sandbox of a pod the agent never learns of gets a CNI error at the
    // deadline, naming why.
    let mut ghost = Sandbox::new(&lab, "w", "ghost", true);
    ghost.list["plugins"][1]["timeoutSeconds"] = json!(1);
    let ran = ghost.add();
    assert!(ran[0].ok);
    let last = ran.last().unwrap();
    assert!(!last.ok, "ADD for an unknown pod succeeded");
    assert_eq!(last.out["code"], 100, "{}", last.out);
    let msg = last.out["msg"].as_str().unwrap_or_default();
    assert!(msg.contains("w/ghost not enforced within"), "{msg}");
    assert!(msg.contains("no endpoint"), "{msg}");
}
