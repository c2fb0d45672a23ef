//! The real agent binary in network namespaces, fed by a manifest directory as in the lab:
//! pods whose veth appears after their manifest (not enforced — and the revision not reported as
//! enforced — until attached, then attached at once), pods changing address, pods vanishing
//! (detached cleanly), invalid input (reported, fail-closed, the agent keeps enforcing), the HTTP
//! endpoints, and `--cleanup-on-exit`. Needs root.

mod agent_support;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use agent_support::{
    Agent, Status, apply_manifests, bridge_pod, connect_echo, echo_server, pod_yaml, ptp_pod,
};
use anyhow::{Result, bail};
use policy_tests::{bpffs::PinDir, netns::NetNs, require_root};

const NODE: &str = "node-1";
const GW: &str = "10.253.1.1";
const PORT: u16 = 8080;

const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
metadata: {namespace: t, name: protect}\nspec:\n  podSelector: {matchLabels: {role: protected}}\n  \
policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n";

fn protected_pod(name: &str, ip: &str) -> String {
    pod_yaml("t", name, name, NODE, ip, PORT).replace(
        &format!("labels: {{app: {name}}}"),
        &format!("labels: {{app: {name}, role: protected}}"),
    )
}

fn addr(ip: &str) -> SocketAddr {
    format!("{ip}:{PORT}").parse().unwrap()
}

/// From `client` the server answers; from `intruder` it does not.
fn assert_protected(client: &NetNs, intruder: &NetNs, ip: &str) {
    let a = addr(ip);
    assert!(
        client.run(move || connect_echo(a, Duration::from_secs(1))),
        "client reaches {ip}"
    );
    assert!(
        !intruder.run(move || connect_echo(a, Duration::from_millis(300))),
        "intruder is denied at {ip}"
    );
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if f()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out waiting for {what}")
}

#[test]
fn agent_follows_pods_and_reports() -> Result<()> {
    require_root();
    let node = NetNs::new("enode")?;
    let client = NetNs::new("eclient")?;
    let intruder = NetNs::new("eintruder")?;
    let web = NetNs::new("eweb")?;
    let late = NetNs::new("elate")?;
    let bridged = NetNs::new("ebridged")?;
    node.sh("sysctl -qw net.ipv4.ip_forward=1")?;
    ptp_pod(&node, &client, "vclient", "10.253.1.2", GW)?;
    ptp_pod(&node, &intruder, "vintruder", "10.253.1.3", GW)?;
    ptp_pod(&node, &web, "vweb", "10.253.1.4", GW)?;
    // A flannel-style pod on a bridge, next to the ptp ones (found through its netns).
    bridge_pod(
        &node,
        &bridged,
        "cni0",
        "vbridged",
        "10.253.9.4/24",
        "10.253.9.1",
    )?;
    let pins = PinDir::new("e2e")?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir)?;
    let http: SocketAddr = "127.0.0.1:9991".parse()?;
    apply_manifests(
        &dir,
        &[
            (
                "client.yaml",
                &pod_yaml("t", "client", "client", NODE, "10.253.1.2", PORT),
            ),
            (
                "intruder.yaml",
                &pod_yaml("t", "intruder", "intruder", NODE, "10.253.1.3", PORT),
            ),
            ("web.yaml", &protected_pod("web", "10.253.1.4")),
            ("bridged.yaml", &protected_pod("bridged", "10.253.9.4")),
            ("policy.yaml", POLICY),
        ],
        1,
    )?;
    let mut agent = Agent::start(
        &node,
        NODE,
        &dir,
        pins.path(),
        http,
        &tmp.path().join("log"),
        &["--flow-log", "--flow-log-allowed"],
    )?;
    agent.wait_enforced(&node, 1, Duration::from_secs(30))?;
    let stop = Arc::new(AtomicBool::new(false));
    let _web_server = echo_server(&web, addr("10.253.1.4"), stop.clone());
    let _bridged_server = echo_server(&bridged, addr("10.253.9.4"), stop.clone());
    assert_protected(&client, &intruder, "10.253.1.4");
    assert_protected(&client, &intruder, "10.253.9.4");
    assert!(pins.path().join("links/to_pod:vbridged").exists());
    assert_eq!(agent.status(&node)?.endpoints, 4);

    // The flow log names the pods and, for allowed flows, the deciding policy and rule.
    wait_until("flow log lines", Duration::from_secs(5), || {
        let log = agent.log_text();
        let flows: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("policy_agent::flow"))
            .collect();
        Ok(flows.iter().any(|l| {
            l.contains("\"reason\":\"dropped_policy\"")
                && l.contains("\"endpoint\":\"t/web\"")
                && l.contains("\"peer\":\"t/intruder\"")
        }) && flows.iter().any(|l| {
            l.contains("\"reason\":\"allowed_by_policy\"")
                && l.contains("\"policy\":\"t/protect\"")
                && l.contains("\"rule\":\"ingress[0]\"")
                && l.contains("\"peer\":\"t/client\"")
        }))
    })?;

    // A pod whose manifest comes before its veth: reported, revision held back.
    apply_manifests(
        &dir,
        &[("late.yaml", &protected_pod("late", "10.253.1.5"))],
        2,
    )?;
    wait_until("revision 2 seen", Duration::from_secs(5), || {
        Ok(agent.status(&node)?.revision >= 2)
    })?;
    std::thread::sleep(Duration::from_millis(200));
    let s = agent.status(&node)?;
    assert_eq!(
        s.enforced_revision, 1,
        "not enforced without its interface: {s:?}"
    );
    assert!(
        s.errors
            .iter()
            .any(|e| e.contains("t/late") && e.contains("no host interface")),
        "{s:?}"
    );
    // The veth appears (as the CNI would create it): attached at once, revision enforced.
    ptp_pod(&node, &late, "vlate", "10.253.1.5", GW)?;
    let late_server = echo_server(&late, addr("10.253.1.5"), stop.clone());
    let took = agent.wait_enforced(&node, 2, Duration::from_secs(5))?;
    println!("late veth attached and revision enforced {took:?} after it appeared");
    assert_protected(&client, &intruder, "10.253.1.5");
    assert!(pins.path().join("links/to_pod:vlate").exists());

    // The pod changes address (new veth, as after a sandbox restart).
    node.ip(&["link", "del", "vlate"])?;
    let late_stop = Arc::new(AtomicBool::new(false));
    ptp_pod(&node, &late, "vlate2", "10.253.1.6", GW)?;
    let _late_server = echo_server(&late, addr("10.253.1.6"), late_stop.clone());
    apply_manifests(
        &dir,
        &[("late.yaml", &protected_pod("late", "10.253.1.6"))],
        3,
    )?;
    agent.wait_enforced(&node, 3, Duration::from_secs(5))?;
    assert_protected(&client, &intruder, "10.253.1.6");
    assert!(pins.path().join("links/to_pod:vlate2").exists());
    assert!(
        !pins.path().join("links/to_pod:vlate").exists(),
        "the vanished interface's links are gone"
    );

    // The pod vanishes.
    std::fs::remove_file(dir.join("late.yaml"))?;
    node.ip(&["link", "del", "vlate2"])?;
    apply_manifests(&dir, &[], 4)?;
    agent.wait_enforced(&node, 4, Duration::from_secs(5))?;
    assert_eq!(agent.status(&node)?.endpoints, 4);
    assert!(!pins.path().join("links/to_pod:vlate2").exists());

    // Invalid input: reported with file and field; the broken policy fails closed; the rest
    // (and the agent) keeps going.
    let intruder_addr = addr("10.253.1.3");
    let _intruder_server = echo_server(&intruder, intruder_addr, stop.clone());
    assert!(
        client.run(move || connect_echo(intruder_addr, Duration::from_secs(1))),
        "nothing isolates the intruder yet"
    );
    apply_manifests(
        &dir,
        &[
            (
                "broken.yaml",
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {namespace: t, name: broken}\n\
             spec:\n  podSelector: {matchLabels: {app: client}}\n  ingress: [{ports: [{port: 80, endPort: lots}]}]\n\
             ---\napiVersion: v1\nkind: Gadget\nmetadata: {name: g}\n",
            ),
            (
                "nameless.yaml",
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: t}\n\
                 spec: {podSelector: {matchLabels: {app: intruder}}, policyTypes: [Ingress]}\n",
            ),
            (
                "cidr.yaml",
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                 metadata: {namespace: t, name: bad-cidr}\n\
                 spec:\n  podSelector: {matchLabels: {app: nobody}}\n  \
                 ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]\n",
            ),
        ],
        5,
    )?;
    agent.wait_enforced(&node, 5, Duration::from_secs(5))?;
    let s = agent.status(&node)?;
    assert!(
        s.errors
            .iter()
            .any(|e| e.contains("broken.yaml") && e.contains("endPort")),
        "{s:?}"
    );
    assert!(s.errors.iter().any(|e| e.contains("Gadget")), "{s:?}");
    // Errors found after parsing (by the compiler) name the file too, in /status and the log.
    let cidr_error = "cidr.yaml: document 1: NetworkPolicy t/bad-cidr: \
                      spec.ingress[0].from[0].ipBlock.cidr";
    assert!(
        s.errors.iter().any(|e| e.contains(cidr_error)),
        "{cidr_error:?} in {s:?}"
    );
    wait_until(
        "the file-named error in the log",
        Duration::from_secs(5),
        || Ok(agent.log_text().contains(cidr_error)),
    )?;
    // A policy without a name still isolates what it selects, in the direction it declares.
    assert!(
        s.errors
            .iter()
            .any(|e| e.contains("nameless.yaml: document 1: NetworkPolicy: metadata.name: missing")),
        "{s:?}"
    );
    assert!(
        !client.run(move || connect_echo(intruder_addr, Duration::from_millis(300))),
        "the nameless policy isolates the intruder"
    );
    let client_addr: SocketAddr = "10.253.1.2:9".parse()?;
    // The client is now isolated in both directions by the fail-closed stand-in: its egress to
    // web is denied. Everything else still enforced.
    let web_addr = addr("10.253.1.4");
    assert!(
        !client.run(move || connect_echo(web_addr, Duration::from_millis(300))),
        "the unparseable policy isolates what it selects"
    );
    let _ = client_addr;
    assert!(!intruder.run(move || connect_echo(web_addr, Duration::from_millis(300))));
    std::fs::remove_file(dir.join("broken.yaml"))?;
    std::fs::remove_file(dir.join("cidr.yaml"))?;
    std::fs::remove_file(dir.join("nameless.yaml"))?;
    apply_manifests(&dir, &[], 6)?;
    agent.wait_enforced(&node, 6, Duration::from_secs(5))?;
    assert_protected(&client, &intruder, "10.253.1.4");
    assert!(client.run(move || connect_echo(intruder_addr, Duration::from_secs(1))));

    // HTTP endpoints.
    assert_eq!(agent.get(&node, "/healthz")?.0, 200);
    assert_eq!(agent.get(&node, "/readyz")?.0, 200);
    wait_until("drop counters in /metrics", Duration::from_secs(5), || {
        let (_, m) = agent.get(&node, "/metrics")?;
        Ok(m.lines().any(|l| {
            l.starts_with("policy_agent_packets_total{reason=\"dropped_policy\"")
                && !l.ends_with(" 0")
        }))
    })?;
    let (_, metrics) = agent.get(&node, "/metrics")?;
    for family in [
        "policy_agent_sync_duration_seconds_bucket",
        "policy_agent_enforcement_latency_seconds_count",
        "policy_agent_map_entries{map=\"POLICY\"}",
        "policy_agent_map_pressure_ratio{map=\"IPCACHE_V4\"}",
        "policy_agent_endpoints{state=\"enforced\"} 4",
        "policy_agent_compile_errors",
        "policy_agent_enforced_revision 6",
    ] {
        assert!(metrics.contains(family), "{family} in\n{metrics}");
    }
    // The TCP port is reachable by any pod that reaches the node: nothing there changes state.
    let (code, _) = agent.get(&node, "/loglevel")?;
    assert_eq!(code, 404, "/loglevel must not be served on the TCP port");
    // The control socket is root's alone, and changes the filter at run time.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&agent.control)?.permissions());
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");
    // The filter as directives (EnvFilter prints them in an order of its own).
    let directives = |o: &std::process::Output| {
        let mut d: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .trim()
            .split(',')
            .map(str::to_string)
            .collect();
        d.sort();
        d
    };
    let before = agent.control(&["loglevel"])?;
    assert!(before.status.success(), "{before:?}");
    assert_eq!(directives(&before), ["info", "policy_agent=debug"]);
    let set = agent.control(&["loglevel", "warn,policy_agent::sync=trace"])?;
    assert!(set.status.success(), "{set:?}");
    let changed = ["policy_agent::sync=trace", "warn"];
    assert_eq!(directives(&set), changed);
    assert_eq!(directives(&agent.control(&["loglevel"])?), changed);
    let bad = agent.control(&["loglevel", "policy_agent=[[["])?;
    assert!(
        !bad.status.success(),
        "an invalid filter is refused: {bad:?}"
    );
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("HTTP 400"),
        "{bad:?}"
    );
    assert_eq!(directives(&agent.control(&["loglevel"])?), changed);
    let status: Status = serde_json::from_slice(&agent.control(&["status"])?.stdout)?;
    assert_eq!(
        status.enforced_revision,
        agent.status(&node)?.enforced_revision
    );
    assert!(status.ready);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    late_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(late_server);
    Ok(())
}

#[test]
fn cleanup_on_exit_removes_enforcement() -> Result<()> {
    require_root();
    let node = NetNs::new("cnode")?;
    let intruder = NetNs::new("cintruder")?;
    let web = NetNs::new("cweb")?;
    node.sh("sysctl -qw net.ipv4.ip_forward=1")?;
    ptp_pod(&node, &intruder, "vintruder", "10.253.2.3", "10.253.2.1")?;
    ptp_pod(&node, &web, "vweb", "10.253.2.4", "10.253.2.1")?;
    let pins = PinDir::new("cleanup")?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir)?;
    apply_manifests(
        &dir,
        &[
            (
                "intruder.yaml",
                &pod_yaml("t", "intruder", "intruder", NODE, "10.253.2.3", PORT),
            ),
            ("web.yaml", &protected_pod("web", "10.253.2.4")),
            ("policy.yaml", POLICY),
        ],
        1,
    )?;
    let mut agent = Agent::start(
        &node,
        NODE,
        &dir,
        pins.path(),
        "127.0.0.1:9992".parse()?,
        &tmp.path().join("log"),
        &["--cleanup-on-exit"],
    )?;
    agent.wait_enforced(&node, 1, Duration::from_secs(30))?;
    let stop = Arc::new(AtomicBool::new(false));
    let _server = echo_server(&web, addr("10.253.2.4"), stop.clone());
    let web_addr = addr("10.253.2.4");
    assert!(!intruder.run(move || connect_echo(web_addr, Duration::from_millis(300))));
    assert!(agent.terminate()?.success());
    assert!(!pins.path().join("maps").exists(), "pins removed");
    assert!(
        intruder.run(move || connect_echo(web_addr, Duration::from_secs(1))),
        "no enforcement left behind"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}
