//! Fixtures for the agent's network-namespace tests, on top of `policy_tests::netns`:
//! the two CNI shapes the agent discovers (kindnet-style ptp veth with a /32 host route,
//! flannel-style veth on a bridge), the real agent binary run in a node namespace exactly as the
//! lab runs it (`ip netns exec NODE policy-agent --manifest-dir … --bpffs-dir …`), and its
//! `/status`.
#![allow(dead_code)]

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use policy_tests::netns::{self, NetNs};

/// A pod attached the way kindnet's ptp plugin does: veth pair, the pod's /32 on its `eth0`, a
/// host route `podIP/32 dev HOSTVETH` in the node namespace, the gateway on the host side.
pub fn ptp_pod(
    node: &NetNs,
    pod: &NetNs,
    host_veth: &str,
    pod_ip: &str,
    gateway: &str,
) -> Result<()> {
    netns::veth(node, host_veth, pod, "eth0")?;
    node.ip(&["addr", "add", &format!("{gateway}/32"), "dev", host_veth])?;
    node.ip(&["route", "add", &format!("{pod_ip}/32"), "dev", host_veth])?;
    pod.ip(&["addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"])?;
    pod.ip(&["route", "add", gateway, "dev", "eth0"])?;
    pod.ip(&["route", "add", "default", "via", gateway, "dev", "eth0"])?;
    Ok(())
}

/// A pod attached the way the bridge plugin (flannel's cni0) does: veth pair, host side enslaved
/// to `bridge` (created with `gateway/prefix` when missing), the pod's address on `eth0`.
pub fn bridge_pod(
    node: &NetNs,
    pod: &NetNs,
    bridge: &str,
    host_veth: &str,
    pod_cidr: &str,
    gateway: &str,
) -> Result<()> {
    let prefix = pod_cidr
        .split('/')
        .nth(1)
        .context("pod_cidr needs a prefix")?;
    if node.ip(&["link", "show", "dev", bridge]).is_err() {
        node.ip(&["link", "add", bridge, "type", "bridge"])?;
        node.ip(&["addr", "add", &format!("{gateway}/{prefix}"), "dev", bridge])?;
        node.ip(&["link", "set", bridge, "up"])?;
    }
    netns::veth(node, host_veth, pod, "eth0")?;
    node.ip(&["link", "set", host_veth, "master", bridge])?;
    pod.ip(&["addr", "add", pod_cidr, "dev", "eth0"])?;
    pod.ip(&["route", "add", "default", "via", gateway, "dev", "eth0"])?;
    Ok(())
}

/// The `policy-agent` binary of this workspace, built (once per test process) with the profile
/// the tests run under, through cargo — so it is never stale.
pub fn agent_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // Variables cargo sets for this test process would look like changed inputs to build
        // scripts that watch them (ring's), forcing rebuilds: drop them.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_MANIFEST_LINKS",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "OUT_DIR",
                ]
                .contains(&key.as_ref())
            {
                cmd.env_remove(key.as_ref());
            }
        }
        cmd.args(["build", "-p", "policy-agent", "--bin", "policy-agent"])
            .args(["--message-format", "json-render-diagnostics"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::inherit());
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("running cargo build -p policy-agent");
        assert!(out.status.success(), "cargo build -p policy-agent failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "policy-agent")
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported no policy-agent executable")
    })
}

/// The agent's `/status`.
pub use policy_common::status::Status;

/// How [`Agent::start_with`] runs the agent beyond [`Agent::start`]'s arguments.
#[derive(Clone, Copy, Debug, Default)]
pub struct Launch<'a> {
    /// Flags after the standard ones.
    pub extra: &'a [&'a str],
    /// A command the agent runs under, inside `ip netns exec NODE` (`unshare …`).
    pub wrapper: &'a [&'a str],
    /// Environment variables set for the agent.
    pub env: &'a [(&'a str, &'a str)],
}

/// One agent process in a node namespace; killed on drop.
pub struct Agent {
    child: Option<Child>,
    pub http: SocketAddr,
    /// The control socket, next to the log.
    pub control: PathBuf,
    pub log: PathBuf,
    node: String,
}

impl Agent {
    /// `ip netns exec NODE policy-agent --node-name NAME --manifest-dir DIR --bpffs-dir PIN
    /// --http-addr HTTP --control-socket LOG.sock [extra…]`, logging to `log`.
    pub fn start(
        node: &NetNs,
        node_name: &str,
        manifests: &Path,
        pins: &Path,
        http: SocketAddr,
        log: &Path,
        extra: &[&str],
    ) -> Result<Agent> {
        let launch = Launch {
            extra,
            ..Launch::default()
        };
        Self::start_with(node, node_name, manifests, pins, http, log, launch)
    }

    /// [`Agent::start`], run under `launch.wrapper` with `launch.env` set:
    /// `ip netns exec NODE [wrapper…] policy-agent …`.
    pub fn start_with(
        node: &NetNs,
        node_name: &str,
        manifests: &Path,
        pins: &Path,
        http: SocketAddr,
        log: &Path,
        launch: Launch<'_>,
    ) -> Result<Agent> {
        let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let control = log.with_extension("sock");
        let child = Command::new("ip")
            .args(["netns", "exec", node.name()])
            .args(launch.wrapper)
            .arg(agent_binary())
            .args(["--node-name", node_name, "--manifest-dir"])
            .arg(manifests)
            .arg("--bpffs-dir")
            .arg(pins)
            .args(["--http-addr", &http.to_string(), "--log-format", "json"])
            .arg("--control-socket")
            .arg(&control)
            .args(launch.extra)
            .envs(launch.env.iter().copied())
            .env("RUST_LOG", "info,policy_agent=debug")
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning policy-agent")?;
        Ok(Agent {
            child: Some(child),
            http,
            control,
            log: log.to_owned(),
            node: node.name().to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("not running")?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        Ok(c.wait()?)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` from the agent's HTTP server (inside the node namespace).
    pub fn get(&self, ns: &NetNs, path: &str) -> Result<(u16, String)> {
        let addr = self.http;
        let path = path.to_owned();
        ns.run(move || http_get(addr, &path))
    }

    pub fn status(&self, ns: &NetNs) -> Result<Status> {
        let (code, body) = self.get(ns, "/status")?;
        if code != 200 {
            bail!("/status: HTTP {code}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("/status body {body:?}"))
    }

    /// `policy-agent control --control-socket SOCKET ARGS…` (from the test's own namespace: a
    /// Unix socket is reached through the filesystem); its exit status and output.
    pub fn control(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(agent_binary())
            .arg("control")
            .arg("--control-socket")
            .arg(&self.control)
            .args(args)
            .output()
            .context("running policy-agent control")
    }

    /// Polls `/status` until `enforced_revision >= revision`; returns how long it took.
    pub fn wait_enforced(
        &mut self,
        ns: &NetNs,
        revision: u64,
        timeout: Duration,
    ) -> Result<Duration> {
        let started = Instant::now();
        let mut last = None;
        while started.elapsed() < timeout {
            if let Some(c) = self.child.as_mut()
                && let Some(exit) = c.try_wait()?
            {
                bail!(
                    "agent exited ({exit}) before enforcing:\n{}",
                    self.log_text()
                );
            }
            match self.status(ns) {
                Ok(s) if s.enforced_revision >= revision => return Ok(started.elapsed()),
                Ok(s) => last = Some(format!("{s:?}")),
                Err(e) => last = Some(e.to_string()),
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        bail!(
            "agent in {} did not enforce revision {revision} within {timeout:?}; last: {last:?}\nlog:\n{}",
            self.node,
            self.log_text()
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    Ok((code, body.to_owned()))
}

/// Writes a manifest file atomically (write, then rename), then `.revision`.
pub fn apply_manifests(dir: &Path, files: &[(&str, &str)], revision: u64) -> Result<()> {
    for (name, text) in files {
        let tmp = dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(&tmp, dir.join(name))?;
    }
    let tmp = dir.join(".revision.tmp");
    fs::write(&tmp, revision.to_string())?;
    fs::rename(&tmp, dir.join(".revision"))?;
    Ok(())
}

/// A Pod manifest placed on `node` with the address the lab (as a kubelet) would report.
pub fn pod_yaml(ns: &str, name: &str, app: &str, node: &str, ip: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{namespace: {ns}, name: {name}, labels: {{app: {app}}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: c, image: x, ports: [{{containerPort: {port}}}]}}]}}\n\
         status: {{podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n"
    )
}

/// Runs `f` on a new thread inside the network namespace `ns` (for servers and load generators
/// that outlive one call).
pub fn spawn_in<T: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{}", ns.name());
    std::thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: a valid namespace descriptor; only this thread switches.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// A TCP echo server on `addr` inside `ns`, until `stop` is set.
pub fn echo_server(
    ns: &NetNs,
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use std::sync::atomic::Ordering;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = spawn_in(ns, move || {
        let listener = std::net::TcpListener::bind(addr).expect("bind echo server");
        listener.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_millis(200)))
                            .unwrap();
                        let mut buf = [0u8; 64];
                        while !stop.load(Ordering::Relaxed) {
                            match s.read(&mut buf) {
                                Ok(0) => return,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("echo server ready");
    handle
}

/// One echo exchange on a fresh connection: true when it completes within `timeout`.
pub fn connect_echo(addr: SocketAddr, timeout: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let mut buf = [0u8; 5];
    s.write_all(b"hello").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"hello"
}
