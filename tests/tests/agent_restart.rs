//! Restart without a gap, with the real agent binary in network namespaces: a node namespace and
//! pods attached kindnet-style (ptp veth, /32 host route), the agent run as the lab runs it
//! (`ip netns exec NODE policy-agent --manifest-dir … --bpffs-dir …`).
//!
//! Under steady load — long-lived allowed connections exchanging every 10 ms, a stream of new
//! allowed connections, a stream of denied connection attempts — the agent is SIGKILLed and
//! restarted. Asserted: zero failed allowed exchanges or connections, zero admitted denied
//! connections, before, during and after the restart; the restarted agent enforces new changes;
//! after a SIGTERM enforcement stays in place. The history before the restart (a pod deleted,
//! pods and policies added later) makes the fresh compiler's numbering differ from the kernel's,
//! so adoption is really exercised. Needs root.

mod agent_support;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use agent_support::{
    Agent, apply_manifests, connect_echo, echo_server, pod_yaml, ptp_pod, spawn_in,
};
use anyhow::Result;
use policy_tests::{bpffs::PinDir, netns::NetNs, require_root};

const NODE: &str = "node-1";
const GATEWAY: &str = "10.252.1.1";
const SERVER_IP: &str = "10.252.1.10";
const CLIENT_IP: &str = "10.252.1.11";
const INTRUDER_IP: &str = "10.252.1.12";
const OLD_IP: &str = "10.252.1.13";
const PORT: u16 = 8080;

fn policy(allowed_apps: &[&str]) -> String {
    let peers: Vec<String> = allowed_apps
        .iter()
        .map(|a| format!("    - podSelector: {{matchLabels: {{app: {a}}}}}\n"))
        .collect();
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{namespace: t, name: server-ingress}}\nspec:\n  \
         podSelector: {{matchLabels: {{app: server}}}}\n  policyTypes: [Ingress]\n  ingress:\n  \
         - from:\n{}    ports: [{{port: {PORT}}}]\n",
        peers.concat()
    )
}

/// Time of day (UTC), to line events up with the agent's log.
fn wall_clock() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = d.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_micros()
    )
}

#[derive(Default)]
struct Counters {
    exchanges: AtomicU64,
    exchange_failures: AtomicU64,
    new_ok: AtomicU64,
    new_failed: AtomicU64,
    denied_attempts: AtomicU64,
    denied_admitted: AtomicU64,
}

/// Allowed and denied traffic until `stop`.
fn start_load(
    client: &NetNs,
    intruder: &NetNs,
    server: SocketAddr,
    stop: &Arc<AtomicBool>,
    c: &Arc<Counters>,
    t0: Instant,
) -> Vec<JoinHandle<()>> {
    let mut handles = Vec::new();
    for _ in 0..4 {
        let (stop, c) = (stop.clone(), c.clone());
        handles.push(spawn_in(client, move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(1))
                .expect("long-lived connection");
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut buf = [0u8; 8];
            while !stop.load(Ordering::Relaxed) {
                let ok = s.write_all(b"ping1234").is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && &buf == b"ping1234";
                if ok {
                    c.exchanges.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.exchange_failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!("established exchange failed at {:?}", t0.elapsed());
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }));
    }
    for _ in 0..2 {
        let (stop, c) = (stop.clone(), c.clone());
        handles.push(spawn_in(client, move || {
            while !stop.load(Ordering::Relaxed) {
                let started = wall_clock();
                if connect_echo(server, Duration::from_secs(1)) {
                    c.new_ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.new_failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "new allowed connection failed at {:?} (started {started})",
                        t0.elapsed()
                    );
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
    }
    for _ in 0..4 {
        let (stop, c) = (stop.clone(), c.clone());
        handles.push(spawn_in(intruder, move || {
            while !stop.load(Ordering::Relaxed) {
                c.denied_attempts.fetch_add(1, Ordering::Relaxed);
                if std::net::TcpStream::connect_timeout(&server, Duration::from_millis(150)).is_ok()
                {
                    c.denied_admitted.fetch_add(1, Ordering::Relaxed);
                    eprintln!("denied connection admitted at {:?}", t0.elapsed());
                }
            }
        }));
    }
    handles
}

#[test]
fn sigkill_and_restart_under_load_loses_nothing() -> Result<()> {
    require_root();
    let node = NetNs::new("rnode")?;
    let server_ns = NetNs::new("rserver")?;
    let client_ns = NetNs::new("rclient")?;
    let intruder_ns = NetNs::new("rintruder")?;
    let old_ns = NetNs::new("rold")?;
    node.sh("sysctl -qw net.ipv4.ip_forward=1")?;
    ptp_pod(&node, &server_ns, "vserver", SERVER_IP, GATEWAY)?;
    ptp_pod(&node, &client_ns, "vclient", CLIENT_IP, GATEWAY)?;
    ptp_pod(&node, &intruder_ns, "vintruder", INTRUDER_IP, GATEWAY)?;
    ptp_pod(&node, &old_ns, "vold", OLD_IP, GATEWAY)?;

    let pins = PinDir::new("restart")?;
    let tmp = tempfile::tempdir()?;
    let manifests = tmp.path().join("manifests");
    std::fs::create_dir(&manifests)?;
    let log = tmp.path().join("agent.log");
    let http: SocketAddr = "127.0.0.1:9990".parse()?;
    let server: SocketAddr = format!("{SERVER_IP}:{PORT}").parse()?;

    // History: "old" exists first; the policy and "client" come later, "old" goes.
    let pod = |name: &str, ip: &str| pod_yaml("t", name, name, NODE, ip, PORT);
    apply_manifests(
        &manifests,
        &[
            ("old.yaml", &pod("old", OLD_IP)),
            ("server.yaml", &pod("server", SERVER_IP)),
            ("intruder.yaml", &pod("intruder", INTRUDER_IP)),
        ],
        1,
    )?;
    let mut agent = Agent::start(&node, NODE, &manifests, pins.path(), http, &log, &[])?;
    agent.wait_enforced(&node, 1, Duration::from_secs(30))?;
    std::fs::remove_file(manifests.join("old.yaml"))?;
    apply_manifests(
        &manifests,
        &[
            ("client.yaml", &pod("client", CLIENT_IP)),
            ("policy.yaml", &policy(&["client"])),
        ],
        2,
    )?;
    agent.wait_enforced(&node, 2, Duration::from_secs(10))?;
    drop(old_ns);

    let stop = Arc::new(AtomicBool::new(false));
    let server_stop = Arc::new(AtomicBool::new(false));
    let echo = echo_server(&server_ns, server, server_stop.clone());
    let counters = Arc::new(Counters::default());
    let t0 = Instant::now();
    let load = start_load(&client_ns, &intruder_ns, server, &stop, &counters, t0);
    std::thread::sleep(Duration::from_millis(700));
    let before_kill = counters.new_ok.load(Ordering::Relaxed);
    assert!(
        before_kill > 0,
        "allowed load is flowing before the restart"
    );

    agent.kill();
    let killed = Instant::now();
    eprintln!("SIGKILL at {:?}", t0.elapsed());
    std::thread::sleep(Duration::from_millis(400)); // no agent at all for a while
    eprintln!("restart at {:?}", t0.elapsed());
    let mut agent = Agent::start(&node, NODE, &manifests, pins.path(), http, &log, &[])?;
    agent.wait_enforced(&node, 2, Duration::from_secs(30))?;
    let back = killed.elapsed();
    eprintln!("enforcing again at {:?}", t0.elapsed());
    let during = counters.new_ok.load(Ordering::Relaxed) - before_kill;
    std::thread::sleep(Duration::from_millis(1000));

    // Load first, server last: a server going away is not a policy failure.
    stop.store(true, Ordering::Relaxed);
    for h in load {
        h.join().expect("load thread");
    }
    server_stop.store(true, Ordering::Relaxed);
    echo.join().expect("echo server");
    let c = &counters;
    let (ex, exf) = (
        c.exchanges.load(Ordering::Relaxed),
        c.exchange_failures.load(Ordering::Relaxed),
    );
    let (ok, failed) = (
        c.new_ok.load(Ordering::Relaxed),
        c.new_failed.load(Ordering::Relaxed),
    );
    let (attempts, admitted) = (
        c.denied_attempts.load(Ordering::Relaxed),
        c.denied_admitted.load(Ordering::Relaxed),
    );
    println!(
        "restart: agent back and enforcing {back:?} after SIGKILL; established exchanges \
         {ex} (failed {exf}); new allowed connections {ok} (failed {failed}, {during} while \
         restarting); denied attempts {attempts} (admitted {admitted})"
    );
    let log_text = agent.log_text();
    assert_eq!(exf, 0, "established allowed connections broke\n{log_text}");
    assert_eq!(failed, 0, "new allowed connections failed\n{log_text}");
    assert_eq!(admitted, 0, "denied connections were admitted\n{log_text}");
    assert!(ex > 100 && ok > 50 && attempts > 20, "the load ran");
    assert!(
        during > 0,
        "allowed connections kept working while no agent ran"
    );
    assert!(
        log_text.contains("adopting the state pinned by a previous agent"),
        "the second agent adopted the pins"
    );

    // The restarted agent is in control: a change is enforced.
    apply_manifests(
        &manifests,
        &[("policy.yaml", &policy(&["client", "intruder"]))],
        3,
    )?;
    agent.wait_enforced(&node, 3, Duration::from_secs(10))?;
    let stop = Arc::new(AtomicBool::new(false));
    let echo = echo_server(&server_ns, server, stop.clone());
    let admitted_now = intruder_ns.run(move || connect_echo(server, Duration::from_secs(1)));
    assert!(
        admitted_now,
        "the new allow rule is enforced by the restarted agent"
    );

    // SIGTERM: the agent exits; enforcement stays.
    apply_manifests(&manifests, &[("policy.yaml", &policy(&["client"]))], 4)?;
    agent.wait_enforced(&node, 4, Duration::from_secs(10))?;
    let status = agent.terminate()?;
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    let denied = intruder_ns.run(move || connect_echo(server, Duration::from_millis(500)));
    let allowed = client_ns.run(move || connect_echo(server, Duration::from_secs(1)));
    assert!(!denied, "denied flows stay denied after the agent stopped");
    assert!(
        allowed,
        "allowed flows stay allowed after the agent stopped"
    );
    assert!(pins.path().join("maps").exists(), "pins left in place");
    stop.store(true, Ordering::Relaxed);
    echo.join().expect("echo server");
    Ok(())
}
