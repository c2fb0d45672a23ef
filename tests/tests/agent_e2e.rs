//! The real agent binary in network namespaces, fed by a manifest directory as in the lab:
//! pods whose veth appears after their manifest (not enforced — and the revision not reported as
//! enforced — until attached, then attached at once), pods changing address, pods vanishing
//! (detached cleanly), invalid input (reported, fail-closed, the agent keeps enforcing), the HTTP
//! endpoints, and `--cleanup-on-exit`. The installation checks: a private bpffs in a pod keeps
//! the agent unready, netfilter rules using the mark mask's bits and a missing uplink are warned
//! about and counted in `/metrics`. Needs root.

mod agent_support;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use agent_support::{
    Agent, Launch, Status, apply_manifests, bridge_pod, connect_echo, echo_server, pod_yaml,
    ptp_pod,
};
use anyhow::{Result, bail};
use policy_tests::{
    bpffs::PinDir,
    netns::{NetNs, unique_name},
    require_root,
};

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
        // No default route and no tunnel in this node namespace: no uplink got to_network.
        "policy_agent_uplinks_attached 0",
        "policy_agent_mark_mask_conflicts 0",
    ] {
        assert!(metrics.contains(family), "{family} in\n{metrics}");
    }
    let log = agent.log_text();
    assert_eq!(
        log.matches("no uplink or tunnel device carries to_network")
            .count(),
        1,
        "warned once, not on every sync:\n{log}"
    );
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

/// `KUBERNETES_SERVICE_HOST` set, as in every pod.
const IN_A_POD: &[(&str, &str)] = &[("KUBERNETES_SERVICE_HOST", "10.96.0.1")];

/// An agent "in a pod" whose `/sys/fs/bpf` is no bpffs and that can see no process with one: it
/// mounts a private bpffs, enforces, and stays unready naming the fix. The same agent able to join
/// the shared bpffs (as `ip netns exec` alone allows) is ready.
///
/// `ip netns exec` gives the agent a fresh sysfs, where `/sys/fs/bpf` is a plain directory. Left
/// at that, the agent would join the mount namespace of its launcher (this test), which has the
/// host's bpffs. `unshare --pid --fork --mount-proc` makes it PID 1 of a new PID namespace with
/// its own `/proc`: no ancestor and no other mount namespace to join, so it really mounts its
/// own, as a container without the hostPath would. `--kill-child` takes it down with `unshare`.
#[test]
fn a_private_bpffs_in_a_pod_keeps_the_agent_unready() -> Result<()> {
    require_root();
    let node = NetNs::new("bnode")?;
    let client = NetNs::new("bclient")?;
    let intruder = NetNs::new("bintruder")?;
    let web = NetNs::new("bweb")?;
    node.sh("sysctl -qw net.ipv4.ip_forward=1")?;
    let gw = "10.253.3.1";
    ptp_pod(&node, &client, "vclient", "10.253.3.2", gw)?;
    ptp_pod(&node, &intruder, "vintruder", "10.253.3.3", gw)?;
    ptp_pod(&node, &web, "vweb", "10.253.3.4", gw)?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir)?;
    apply_manifests(
        &dir,
        &[
            (
                "client.yaml",
                &pod_yaml("t", "client", "client", NODE, "10.253.3.2", PORT),
            ),
            (
                "intruder.yaml",
                &pod_yaml("t", "intruder", "intruder", NODE, "10.253.3.3", PORT),
            ),
            ("web.yaml", &protected_pod("web", "10.253.3.4")),
            ("policy.yaml", POLICY),
        ],
        1,
    )?;
    // On the private bpffs only: never created in the host's.
    let private_pins = std::path::Path::new("/sys/fs/bpf").join(unique_name("private"));
    let mut agent = Agent::start_with(
        &node,
        NODE,
        &dir,
        &private_pins,
        "127.0.0.1:9993".parse()?,
        &tmp.path().join("log"),
        Launch {
            wrapper: &[
                "unshare",
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
            ],
            env: IN_A_POD,
            ..Launch::default()
        },
    )?;
    agent.wait_enforced(&node, 1, Duration::from_secs(30))?;
    // It enforces all the same.
    let stop = Arc::new(AtomicBool::new(false));
    let _server = echo_server(&web, addr("10.253.3.4"), stop.clone());
    assert_protected(&client, &intruder, "10.253.3.4");
    let (code, body) = agent.get(&node, "/readyz")?;
    assert_eq!(code, 503, "{body}");
    for part in ["bpffs", "private", "hostPath", "mountPropagation"] {
        assert!(body.contains(part), "{part} in /readyz: {body}");
    }
    let s = agent.status(&node)?;
    assert!(
        s.errors.first().is_some_and(|e| body.contains(e.as_str())),
        "/status errors carry the line of /readyz: {s:?}"
    );
    let log = agent.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("\"level\":\"ERROR\"") && l.contains("mountPropagation")),
        "logged at error level:\n{log}"
    );
    assert!(log.contains("mounted a new bpffs"), "{log}");
    assert!(
        !private_pins.exists(),
        "the pins went to the private bpffs, not the host's"
    );
    // Still unready later: no sync makes it ready.
    apply_manifests(&dir, &[], 2)?;
    agent.wait_enforced(&node, 2, Duration::from_secs(5))?;
    assert_eq!(agent.get(&node, "/readyz")?.0, 503);
    // SIGKILL to unshare; --kill-child passes it on to the agent.
    agent.kill();
    wait_until(
        "the agent gone with unshare",
        Duration::from_secs(5),
        || Ok(agent.get(&node, "/healthz").is_err()),
    )?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    // The same pod environment, where the shared bpffs can be joined: ready.
    let pins = PinDir::new("podjoin")?;
    let mut agent = Agent::start_with(
        &node,
        NODE,
        &dir,
        pins.path(),
        "127.0.0.1:9995".parse()?,
        &tmp.path().join("log2"),
        Launch {
            env: IN_A_POD,
            ..Launch::default()
        },
    )?;
    agent.wait_enforced(&node, 2, Duration::from_secs(30))?;
    assert_eq!(agent.get(&node, "/readyz")?, (200, "ready".to_owned()));
    assert!(agent.status(&node)?.errors.is_empty());
    assert!(
        pins.path().join("maps").exists(),
        "pinned in the shared bpffs"
    );
    Ok(())
}

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: t}\n";

/// Netfilter rules of the node that use the mark mask's bits are named in a warning and counted
/// (kube-proxy's 0x4000 is not); a tunnel device of the default set gets to_network, and losing it
/// is warned about once.
#[test]
fn mark_mask_conflicts_and_uplinks_are_reported() -> Result<()> {
    require_root();
    let node = NetNs::new("mnode")?;
    // Rules inside the test's own namespace: nft natively, iptables through iptables-nft.
    node.sh("nft add table inet agenttest
         nft add chain inet agenttest marks '{ type filter hook forward priority 0; }'
         nft add rule inet agenttest marks meta mark set 0x10000
         iptables -t mangle -A PREROUTING -j MARK --set-xmark 0x20000/0x20000
         iptables -t nat -N KUBE-MARK-MASQ
         iptables -t nat -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000")?;
    // flannel's WireGuard device (a veth to another namespace stands in): an uplink by name.
    let other = NetNs::new("mother")?;
    policy_tests::netns::veth(&node, "flannel-wg", &other, "eth0")?;
    let pins = PinDir::new("marks")?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir)?;
    apply_manifests(&dir, &[("ns.yaml", NAMESPACE)], 1)?;
    let mut agent = Agent::start(
        &node,
        NODE,
        &dir,
        pins.path(),
        "127.0.0.1:9994".parse()?,
        &tmp.path().join("log"),
        &[],
    )?;
    agent.wait_enforced(&node, 1, Duration::from_secs(30))?;
    wait_until(
        "the mark-mask check in /metrics",
        Duration::from_secs(10),
        || {
            let (_, m) = agent.get(&node, "/metrics")?;
            Ok(m.contains("policy_agent_mark_mask_conflicts 2"))
        },
    )?;
    let (_, metrics) = agent.get(&node, "/metrics")?;
    assert!(
        metrics.contains("policy_agent_uplinks_attached 1"),
        "{metrics}"
    );
    assert!(pins.path().join("links/to_network:flannel-wg").exists());
    let log = agent.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\"") && l.contains("--mark-mask"))
        .collect();
    assert_eq!(warnings.len(), 2, "{log}");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("nft inet agenttest chain marks") && w.contains("0x0fff0000")),
        "{warnings:#?}"
    );
    assert!(
        warnings.iter().any(|w| w
            .contains("iptables mangle: -A PREROUTING -j MARK --set-xmark 0x20000/0x20000")
            && w.contains("0x00020000")),
        "{warnings:#?}"
    );
    assert!(!log.contains("no uplink or tunnel device"), "{log}");

    // The tunnel goes: warned once, and the gauge says so.
    node.ip(&["link", "del", "flannel-wg"])?;
    wait_until("no uplink in /metrics", Duration::from_secs(5), || {
        let (_, m) = agent.get(&node, "/metrics")?;
        Ok(m.contains("policy_agent_uplinks_attached 0"))
    })?;
    wait_until("the missing uplink warned", Duration::from_secs(5), || {
        Ok(agent
            .log_text()
            .contains("no uplink or tunnel device carries to_network"))
    })?;
    Ok(())
}
