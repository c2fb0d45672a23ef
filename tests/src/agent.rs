//! Running the real `policy-agent` binary inside a node namespace with the manifest-directory
//! source, and waiting for it to enforce a revision.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use policy_common::status::{REVISION_FILE, Status};

use crate::netns::NetNs;

/// The agent binary of this workspace (`cargo build [--release] -p policy-agent` first).
pub fn agent_binary() -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    ["release", "debug"]
        .iter()
        .map(|profile| target.join(profile).join("policy-agent"))
        .find(|p| p.exists())
        .with_context(|| {
            format!(
                "no policy-agent binary under {}; build it first",
                target.display()
            )
        })
}

/// Writes `DIR/.revision` atomically (the agent reads it before the manifests of a scan).
pub fn write_revision(dir: &Path, revision: u64) -> Result<()> {
    let file = dir.join(REVISION_FILE);
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, revision.to_string())?;
    std::fs::rename(&tmp, file)?;
    Ok(())
}

/// One agent process in a node namespace; killed (and its pins removed) on drop.
pub struct Agent {
    pub child: Child,
    pub http: SocketAddr,
    pub pins: PathBuf,
}

impl Agent {
    pub fn start(
        node: &NetNs,
        node_name: &str,
        manifest_dir: &Path,
        node_ips: &[String],
        uplinks: &[&str],
    ) -> Result<Self> {
        let pins = PathBuf::from(format!("/sys/fs/bpf/{}", node.name()));
        let control = std::env::temp_dir().join(format!("{}.control.sock", node.name()));
        let http: SocketAddr = "127.0.0.1:9965".parse()?;
        let child = Command::new("ip")
            .args(["netns", "exec", node.name()])
            .arg(agent_binary()?)
            .args(["--node-name", node_name, "--manifest-dir"])
            .arg(manifest_dir)
            .arg("--bpffs-dir")
            .arg(&pins)
            .args([
                "--http-addr",
                &http.to_string(),
                "--node-ip",
                &node_ips.join(","),
                "--uplink",
                &uplinks.join(","),
            ])
            .arg("--control-socket")
            .arg(&control)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting policy-agent")?;
        Ok(Self { child, http, pins })
    }

    /// Polls `/status` from inside `node` until `enforced_revision >= revision`.
    pub fn wait_enforced(
        &mut self,
        node: &NetNs,
        revision: u64,
        timeout: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("policy-agent in {} exited: {status}", node.name());
            }
            if let Ok(body) = http_get(node, self.http, "/status")
                && serde_json::from_str::<Status>(&body)
                    .is_ok_and(|s| s.enforced_revision >= revision)
            {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "policy-agent in {} did not enforce revision {revision} within {timeout:?}",
                    node.name()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

/// A plain HTTP/1.0 GET from inside `ns`; returns the body.
pub fn http_get(ns: &NetNs, addr: SocketAddr, path: &str) -> Result<String> {
    ns.run(|| {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let (head, body) = resp
            .split_once("\r\n\r\n")
            .context("malformed HTTP response")?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
        }
        Ok(body.to_owned())
    })
}

/// One agent per node of `cluster`, reading `manifest_dir`; returns once every agent enforces
/// `revision`, with the slowest agent's time.
pub fn start_all(
    cluster: &crate::cluster::Cluster,
    manifest_dir: &Path,
    revision: u64,
) -> Result<(Vec<Agent>, Duration)> {
    use crate::cluster::{gateway_ip, node_ip};
    let mut agents = Vec::new();
    let mut slowest = Duration::ZERO;
    for node in &cluster.nodes {
        let ips = [
            node_ip(node.index).to_string(),
            gateway_ip(node.index).to_string(),
        ];
        let name = format!("node-{}", node.index);
        let mut agent = Agent::start(
            &node.netns,
            &name,
            manifest_dir,
            &ips,
            &[node.uplink.as_str()],
        )?;
        slowest =
            slowest.max(agent.wait_enforced(&node.netns, revision, Duration::from_secs(60))?);
        agents.push(agent);
    }
    Ok((agents, slowest))
}
