//! The per-node agents: the production `policy-agent` binary fed by the manifest directory, and the
//! convergence protocol — the lab writes objects, then `DIR/.revision`, and waits until every
//! agent's `GET /status` reports `enforced_revision` at least that number.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use super::net::{enter_netns, open_netns, process_alive};

/// `GET /status` of an agent, as the agent defines it.
pub use policy_common::status::{ObjectsDigest, Status};

/// Where to reach one agent.
#[derive(Clone, Debug)]
pub struct AgentRef {
    pub node: String,
    pub netns: String,
    pub addr: SocketAddr,
    pub pid: u32,
    pub log: PathBuf,
}

/// The workspace root (xtask lives in `<root>/xtask`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// `cargo build --release -p policy-agent`, returning the binary's path. `LAB_AGENT_PROFILE`
/// picks another cargo profile (`dev` reuses what `cargo test` already compiled).
pub fn build() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let profile = std::env::var("LAB_AGENT_PROFILE").unwrap_or_else(|_| "release".into());
    eprintln!("building the agent: cargo build --profile {profile} -p policy-agent");
    let mut cmd = Command::new(cargo);
    xtask_env(&mut cmd);
    let mut child = cmd
        .current_dir(workspace_root())
        .args([
            "build",
            "--profile",
            &profile,
            "-p",
            "policy-agent",
            "--bin",
            "policy-agent",
            "--message-format=json-render-diagnostics",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running cargo build for policy-agent")?;
    let mut exe = None;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == "policy-agent"
            && let Some(path) = msg["executable"].as_str()
        {
            exe = Some(PathBuf::from(path));
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo build --profile {profile} -p policy-agent failed ({status})");
    }
    exe.ok_or_else(|| anyhow!("cargo build did not report the policy-agent executable"))
}

/// Gives a nested cargo the environment it has under `cargo xtask …` (`cargo run` sets the
/// package variables of xtask), whether xtask runs through the alias, from `cargo test` or
/// directly. Build scripts such as ring's ask cargo to rebuild when these change, so a differing
/// environment would recompile the agent and much of its dependency tree from scratch.
fn xtask_env(cmd: &mut Command) {
    for (k, v) in [
        ("CARGO_MANIFEST_DIR", env!("CARGO_MANIFEST_DIR")),
        (
            "CARGO_MANIFEST_PATH",
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        ),
        ("CARGO_PKG_NAME", env!("CARGO_PKG_NAME")),
        ("CARGO_PKG_VERSION", env!("CARGO_PKG_VERSION")),
        ("CARGO_PKG_VERSION_MAJOR", env!("CARGO_PKG_VERSION_MAJOR")),
        ("CARGO_PKG_VERSION_MINOR", env!("CARGO_PKG_VERSION_MINOR")),
        ("CARGO_PKG_VERSION_PATCH", env!("CARGO_PKG_VERSION_PATCH")),
        ("CARGO_PKG_VERSION_PRE", env!("CARGO_PKG_VERSION_PRE")),
    ] {
        cmd.env(k, v);
    }
    for k in [
        "CARGO_MANIFEST_LINKS",
        "OUT_DIR",
        "DEBUG",
        "CARGO_TARGET_TMPDIR",
    ] {
        cmd.env_remove(k);
    }
}

/// The last lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let tail = &all[all.len().saturating_sub(lines)..];
    if tail.is_empty() {
        format!("({} is empty)", path.display())
    } else {
        format!(
            "last lines of {}:\n    {}",
            path.display(),
            tail.join("\n    ")
        )
    }
}

/// A minimal HTTP/1.1 GET (the agents speak plain HTTP); returns status code and body.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    http_request("GET", addr, path, None, timeout)
}

/// A minimal HTTP/1.1 request with an optional JSON body; returns status code and body.
pub fn http_request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response from {addr}"))?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("malformed HTTP status line from {addr}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// Fetches one agent's status; must run on a thread inside the agent's network namespace.
pub fn status(addr: SocketAddr) -> Result<Status> {
    let (code, body) = http_get(addr, "/status", Duration::from_millis(500))?;
    if code != 200 {
        bail!("GET /status answered {code}: {}", body.trim());
    }
    serde_json::from_str(&body).with_context(|| format!("GET /status: unexpected body {body:?}"))
}

/// Waits until every agent has enforced `revision`; returns the statuses and the time it took.
pub fn wait_converged(
    agents: &[AgentRef],
    revision: u64,
    timeout: Duration,
) -> Result<(Vec<Status>, Duration)> {
    wait_until(agents, timeout, &format!("revision {revision}"), |st| {
        st.enforced_revision >= revision
    })
}

/// Waits until every agent's status satisfies `done` (`target` names it in errors); returns the
/// statuses and the time it took.
pub fn wait_until(
    agents: &[AgentRef],
    timeout: Duration,
    target: &str,
    done: impl Fn(&Status) -> bool + Sync,
) -> Result<(Vec<Status>, Duration)> {
    let done = &done;
    let start = Instant::now();
    let deadline = start + timeout;
    let results: Vec<Result<Status>> = thread::scope(|s| {
        let handles: Vec<_> = agents
            .iter()
            .map(|a| {
                s.spawn(move || -> Result<Status> {
                    let ns = open_netns(&a.netns)?;
                    enter_netns(&ns)?;
                    let mut last;
                    loop {
                        if !process_alive(a.pid) {
                            bail!(
                                "the agent on {} (pid {}) is not running; {}",
                                a.node,
                                a.pid,
                                log_tail(&a.log, 15)
                            );
                        }
                        match status(a.addr) {
                            Ok(st) if done(&st) => return Ok(st),
                            Ok(st) => {
                                last = format!(
                                    "enforced revision {} (read {}), objects {:?}, errors {:?}, source errors {:?}",
                                    st.enforced_revision,
                                    st.revision,
                                    st.enforced_objects,
                                    st.errors,
                                    st.source_errors
                                )
                            }
                            Err(e) => last = format!("{e:#}"),
                        }
                        if Instant::now() >= deadline {
                            bail!(
                                "the agent on {} did not enforce {target} within {:?}: {last}; {}",
                                a.node,
                                timeout,
                                log_tail(&a.log, 15)
                            );
                        }
                        thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("status poller panicked")))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    let statuses = results.into_iter().collect::<Result<Vec<_>>>()?;
    Ok((statuses, elapsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n"), "{\"a\":1}");
    }
}
