//! Named network namespaces for tests, deleted on drop.
//!
//! Names carry a per-process prefix (`pt<pid>-<n>-<tag>`) so parallel tests and a crashed
//! earlier run never collide. Nothing here touches the root network namespace: links are created
//! inside the test's namespaces (`ip -n NS link add ... peer ... netns OTHER`).

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique name with the given tag: `pt<pid>-<n>-<tag>`.
pub fn unique_name(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("pt{}-{n}-{tag}", std::process::id())
}

/// A named network namespace (`ip netns add`), deleted with everything in it on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `pt<pid>-<n>-<tag>` with its loopback up.
    pub fn new(tag: &str) -> Result<NetNs> {
        crate::require_root();
        let name = unique_name(tag);
        run_cmd(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run_cmd(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs a shell script inside the namespace; fails on a non-zero exit.
    pub fn sh(&self, script: &str) -> Result<Output> {
        run_cmd(
            Command::new("ip")
                .args(["netns", "exec", &self.name, "sh", "-ec"])
                .arg(script),
        )
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it creates live there, and
    /// interface names resolve there), and returns its result.
    pub fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                    // SAFETY: a valid namespace file descriptor; only this thread switches.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("thread inside the network namespace panicked")
        })
    }

    /// The ifindex of `ifname` inside this namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let out = self.ip(&["-o", "link", "show", "dev", ifname])?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("no ifindex for {ifname} in {}: {text}", self.name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs a command, failing with its output on a non-zero exit.
pub fn run_cmd(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

impl NetNs {
    /// Creates a namespace with exactly this name (callers derive it from [`unique_name`]), its
    /// loopback up.
    pub fn named(name: String) -> Result<NetNs> {
        crate::require_root();
        run_cmd(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip netns exec NAME PROGRAM ARGS`; returns stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = run_cmd(
            Command::new("ip")
                .args(["netns", "exec", &self.name, program])
                .args(args),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Creates a veth pair with `host_if` in `host` and `peer_if` in `peer`, both up.
pub fn veth(host: &NetNs, host_if: &str, peer: &NetNs, peer_if: &str) -> Result<()> {
    host.ip(&[
        "link",
        "add",
        host_if,
        "type",
        "veth",
        "peer",
        "name",
        peer_if,
        "netns",
        peer.name(),
    ])?;
    host.ip(&["link", "set", host_if, "up"])?;
    peer.ip(&["link", "set", peer_if, "up"])?;
    Ok(())
}

/// The index of interface `name` in the calling thread's network namespace (sysfs would show the
/// namespace it was mounted in, not the thread's).
pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("interface {name}: {}", std::io::Error::last_os_error()),
        i => Ok(i),
    }
}
