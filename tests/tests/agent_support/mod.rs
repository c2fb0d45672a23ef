//! Network-namespace fixtures for the agent tests: named namespaces removed on drop, commands run
//! inside them, closures run on a thread moved into one, and the two CNI shapes the agent
//! discovers (kindnet-style ptp veth with a /32 host route, flannel-style veth on a bridge).
#![allow(dead_code)]

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

/// Fails (never skips) without root: these tests need network namespaces.
pub fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (network namespaces, veth, eBPF)"
    );
}

/// A short prefix unique to this process and call, for namespace and interface names.
pub fn unique_prefix(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}{}x{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn check(what: &str, out: std::io::Result<Output>) -> String {
    let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `ip ARGS` in the root namespace (only ever to create/delete namespaces and move links).
pub fn ip(args: &[&str]) -> String {
    check(
        &format!("ip {}", args.join(" ")),
        Command::new("ip").args(args).output(),
    )
}

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        ip(&["netns", "add", name]);
        let ns = Self { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip ARGS` inside this namespace.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Any command inside this namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    /// `Command` running `program` inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `f` on a fresh thread moved into this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = File::open(self.path()).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(|| {
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }

    pub fn ifindex(&self, ifname: &str) -> u32 {
        let out = self.ip(&["-o", "link", "show", "dev", ifname]);
        out.split(':').next().unwrap().trim().parse().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A pod attached the way kindnet's ptp plugin does: veth pair, the pod's /32 on its `eth0`, a
/// host route `podIP/32 dev HOSTVETH` in the node namespace, default route via the host side.
pub fn ptp_pod(node: &Netns, pod: &Netns, host_veth: &str, pod_ip: &str, gateway: &str) {
    node.ip(&[
        "link", "add", host_veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
    ]);
    node.ip(&["addr", "add", &format!("{gateway}/32"), "dev", host_veth]);
    node.ip(&["link", "set", host_veth, "up"]);
    node.ip(&["route", "add", &format!("{pod_ip}/32"), "dev", host_veth]);
    pod.ip(&["addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", gateway, "dev", "eth0"]);
    pod.ip(&["route", "add", "default", "via", gateway, "dev", "eth0"]);
}

/// A pod attached the way the bridge plugin (flannel's cni0) does: veth pair, host side enslaved
/// to `bridge` (created with `gateway/prefix` when missing), the pod's address on `eth0`.
pub fn bridge_pod(
    node: &Netns,
    pod: &Netns,
    bridge: &str,
    host_veth: &str,
    pod_cidr: &str,
    gateway: &str,
) {
    let prefix = pod_cidr.split('/').nth(1).unwrap();
    if node
        .exec("ip", &["link", "show", "dev", bridge])
        .status
        .code()
        != Some(0)
    {
        node.ip(&["link", "add", bridge, "type", "bridge"]);
        node.ip(&["addr", "add", &format!("{gateway}/{prefix}"), "dev", bridge]);
        node.ip(&["link", "set", bridge, "up"]);
    }
    node.ip(&[
        "link", "add", host_veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
    ]);
    node.ip(&["link", "set", host_veth, "master", bridge]);
    node.ip(&["link", "set", host_veth, "up"]);
    pod.ip(&["addr", "add", pod_cidr, "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", "default", "via", gateway, "dev", "eth0"]);
}
