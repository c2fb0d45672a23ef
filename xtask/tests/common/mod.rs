//! Helpers shared by the lab tests: a lab driven through `xtask lab`, torn down on drop.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

pub const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where the lab keeps its state (as xtask computes it).
pub fn state_dir(prefix: &str) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("lab")
        .join(prefix)
}

pub fn require_root() {
    // SAFETY: plain syscall.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the lab tests need root (network namespaces, bpffs, nftables)"
    );
}

/// A lab prefix unique to this process and test.
pub fn prefix(tag: char) -> String {
    let mut n = std::process::id() % 36u32.pow(6);
    let mut s = String::new();
    for _ in 0..6 {
        s.push(std::char::from_digit(n % 36, 36).unwrap());
        n /= 36;
    }
    format!("t{s}{tag}")
}

/// `kubectl-netpol ARGS`, built from this workspace.
pub fn netpol(args: &[&str]) -> std::process::Output {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    std::process::Command::new(cargo)
        .current_dir(root())
        .args([
            "run",
            "--quiet",
            "-p",
            "policy-agent",
            "--bin",
            "kubectl-netpol",
            "--",
        ])
        .args(args)
        .output()
        .expect("cargo runs")
}

/// `kubectl netpol ARGS` (a successful run each time) until `done` holds for its output or ten
/// seconds have passed; the last output. Flow records reach the agents' stores asynchronously.
pub fn netpol_until(args: &[&str], done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = netpol(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        if done(&text) || std::time::Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Runs `f` on a thread inside network namespace `name` (sockets made there stay there).
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on a descriptor we own, on this thread only.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

/// The network namespace of lab pod `ns/name` (from the lab's state file).
pub fn pod_netns(prefix: &str, key: &str) -> String {
    let state: Value =
        serde_json::from_slice(&std::fs::read(state_dir(prefix).join("state.json")).unwrap())
            .unwrap();
    state["pods"][key]["netns"]
        .as_str()
        .unwrap_or_else(|| panic!("no pod {key} in the lab's state"))
        .to_string()
}

pub struct LabGuard {
    pub prefix: String,
}

impl LabGuard {
    pub fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(XTASK)
            .current_dir(root())
            .env("RUST_BACKTRACE", "0")
            .arg("lab")
            .arg("--prefix")
            .arg(&self.prefix)
            .args(args)
            .output()
            .expect("xtask runs");
        eprintln!(
            "$ xtask lab --prefix {} {}\n{}{}",
            self.prefix,
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "xtask lab {} failed", args.join(" "));
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).expect("JSON output")
    }

    /// `connected` of the single probe this asks for.
    pub fn connected(&self, args: &[&str]) -> bool {
        let mut a = vec!["probe", "--json"];
        a.extend_from_slice(args);
        let v = self.json(&a);
        let probes = v["probes"].as_array().unwrap();
        assert_eq!(probes.len(), 1, "{v}");
        probes[0]["connected"].as_bool().unwrap()
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

/// Everything of this lab that could survive `down`.
pub fn remains(prefix: &str) -> Vec<String> {
    let mut left = Vec::new();
    for e in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let n = e.file_name().into_string().unwrap();
        if n.starts_with(&format!("{prefix}-")) {
            left.push(format!("network namespace {n}"));
        }
    }
    for e in std::fs::read_dir("/sys/fs/bpf")
        .into_iter()
        .flatten()
        .flatten()
    {
        let n = e.file_name().into_string().unwrap();
        if n.starts_with(&format!("{prefix}-")) {
            left.push(format!("bpffs pin {n}"));
        }
    }
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().into_string().unwrap().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let ours = args
            .windows(2)
            .any(|w| w[0] == "--prefix" && w[1] == prefix && args.iter().any(|a| a == "serve"))
            || args
                .iter()
                .any(|a| a.starts_with(&format!("/sys/fs/bpf/{prefix}-")));
        if ours {
            left.push(format!("process {pid}: {}", args.join(" ")));
        }
    }
    if state_dir(prefix).exists() {
        left.push("state directory".into());
    }
    left
}
