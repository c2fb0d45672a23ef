//! Real nodes for the real-API lab (`lab up --api kube --kubelet`): every node namespace runs a
//! containerd (Debian's, with runc) and a kubelet built from the pinned Kubernetes module, as a
//! kind node runs them in its container. The lab then plays neither scheduler nor kubelet: the
//! real kube-scheduler binds pods, the kubelet runs them through containerd and the real CNI
//! plugins, and the agent comes from the DaemonSet (`kubectl apply -k deploy/overlays/…`).
//!
//! Each node's processes share one private mount namespace, so that the host paths a pod mounts
//! are the node's own, as on a kind node: a tmpfs on `/run` (containerd's socket and shim
//! sockets, `/run/netns` where containerd pins pod network namespaces), a fresh bpffs on
//! `/sys/fs/bpf` (the agent's pins, one set per node), and `/` made shared inside the namespace
//! (kubelet and containerd require shared or slave propagation for `HostToContainer` mounts).
//! Nothing mounted there is visible from the host. containerd's and the kubelet's state live
//! under the lab's directory, `nodes/<node>/`.
//!
//! cgroups (v1 here, cgroupfs driver): each node has its own `cgroupRoot`, `/<prefix>-node-N` in
//! every hierarchy, so two kubelets on one machine never manage each other's pods; the node's
//! first process joins `pids:/<prefix>-node-N`, so every process of the node — containerd, shims,
//! containers — is found there by `lab down`, which kills them and removes the cgroups.
//!
//! Differences from a kind node, by necessity of this machine: no systemd inside the node (the
//! processes are started directly), containerd may not lower OOM scores below its own
//! (`restrict_oom_score_adj`, as in rootless kind), and the kubelet's cgroups are cgroup v1.

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{
    agent,
    cluster::{Lab, NodeState},
    images,
    kube::{API_PORT, CNI_BIN_DIR, CONTROL_PLANE_IP, CniShape, Files},
    topology::{self as topo, Names},
};

/// cgroup v1 hierarchies the kubelet's `cgroupRoot` must exist in.
const HIERARCHIES: &[&str] = &[
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "systemd",
];
const CGROUP_FS: &str = "/sys/fs/cgroup";
/// How long the nodes have to register and become Ready.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// The component name of a node's containerd + kubelet.
pub fn component(node: &str) -> String {
    format!("node-runtime-{node}")
}

impl Lab {
    /// Builds the images, starts containerd and the kubelet on every node, and waits until every
    /// node is Ready and schedulable.
    pub(crate) fn start_nodes(
        &mut self,
        agent_bin: &Path,
        node_bins: &crate::kube::Binaries,
    ) -> Result<()> {
        let built = images::build_all(&self.paths.dir.join("images"), agent_bin, node_bins)?;
        let files = Files::of(self);
        for node in self.state.nodes.clone() {
            let dir = self.paths.dir.join("nodes").join(&node.name);
            let script = self.write_node_files(&node, &dir, &files, &built, node_bins)?;
            create_cgroups(&node.netns)?;
            let mut cmd = Command::new("unshare");
            cmd.args(["--mount", "--propagation", "private", "/bin/sh"])
                .arg(&script);
            self.add_component(&component(&node.name), &node.netns, cmd, false)?;
        }
        self.wait_nodes_ready(READY_TIMEOUT)
    }

    /// containerd's configuration, the CNI chain, the kubelet's configuration and kubeconfig,
    /// and the script that starts them in the node's mount namespace.
    fn write_node_files(
        &self,
        node: &NodeState,
        dir: &Path,
        files: &Files,
        built: &images::Built,
        node_bins: &crate::kube::Binaries,
    ) -> Result<PathBuf> {
        let cni_dir = dir.join("cni");
        std::fs::create_dir_all(&cni_dir)?;
        let paths = NodeCniPaths::of(self.kube().cni);
        let p = |name: &str| dir.join(name).display().to_string();
        let containerd = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
# Plugins that would use host paths or need kernel features this machine lacks.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # The lab runs without CAP_SYS_RESOURCE: scores below containerd's own cannot be set.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
"#,
            root = p("containerd/root"),
            state = p("containerd/state"),
            pause = built.pause,
            bin = paths.bin,
            conf = paths.conf,
        );
        std::fs::write(dir.join("containerd.toml"), containerd)?;
        // The same chain the lab's own kubelet invokes (kindnet's ptp or flannel's bridge, with
        // host-local), as a conflist; containerd runs loopback itself.
        let list = super::kube::conflist(vec![self.cni_config(node)]);
        std::fs::write(cni_dir.join("10-lab.conflist"), list.to_string())?;
        let ca = files.path("ca.crt").display().to_string();
        std::fs::write(
            dir.join("kubeconfig"),
            super::kube::kubeconfig_text(
                &format!("https://{CONTROL_PLANE_IP}:{API_PORT}"),
                Path::new(&ca),
                &files.node_token(&node.name)?,
            ),
        )?;
        let dns = topo::SERVICE_CIDR.nth(10);
        let kubelet = json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": true},
                "x509": {"clientCAFile": ca},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": format!("/{}", node.netns),
            // This machine has cgroup v1 (hybrid); v1.34 still runs on it when asked.
            "failCgroupV1": false,
            "failSwapOn": false,
            "clusterDNS": [dns.to_string()],
            "clusterDomain": "cluster.local",
            "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
            "podLogsDir": p("pod-logs"),
            "address": node.ip().to_string(),
            "healthzBindAddress": "127.0.0.1",
            "readOnlyPort": 0,
            // A test cluster on a shared disk: evict only when the machine is nearly full, and
            // never collect the imported images (no registry to pull them back from).
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "resolvConf": "/etc/resolv.conf",
        });
        std::fs::write(
            dir.join("kubelet.yaml"),
            serde_json::to_string_pretty(&kubelet)?,
        )?;
        let archives: Vec<String> = built
            .archives
            .iter()
            .map(|a| format!("'{}'", a.display()))
            .collect();
        let containerd_log = self
            .paths
            .logs()
            .join(format!("containerd-{}.log", node.name));
        let script = format!(
            r#"#!/bin/sh
# containerd and the kubelet of lab node {name}, in its network namespace and (unshare) a private
# mount namespace of their own.
set -eu
echo $$ > {CGROUP_FS}/pids/{cg}/cgroup.procs
mount --make-rshared /
mount -t tmpfs -o mode=0755 lab-node-run /run
mkdir -p /run/netns /run/containerd
# The CNI directories where {flavor} has them, writable for the DaemonSet (which chains its
# plugin there) without touching the machine's own: an overlay on each top directory (its
# upper layer under this node's state), and Debian's plugins as the lower layer of bin_dir.
overlay() {{
  mkdir -p "$2/upper" "$2/work"
  mount -t overlay lab-node -o "lowerdir=$3,upperdir=$2/upper,workdir=$2/work" "$1"
}}
{tops}
mkdir -p '{conf}' '{bin}'
overlay '{bin}' '{dir}/overlay/cni-bin' '{CNI_BIN_DIR}'
cp '{dir}/cni/10-lab.conflist' '{conf}/{conf_file}'
umount -l /sys/fs/bpf 2>/dev/null || true
mount -t bpf bpf /sys/fs/bpf
containerd --config '{dir}/containerd.toml' >> '{containerd_log}' 2>&1 &
i=0
while [ ! -S /run/containerd/containerd.sock ]; do
  i=$((i + 1))
  if [ "$i" -gt 150 ]; then echo "containerd did not start within 30 s: see {containerd_log}" >&2; exit 1; fi
  sleep 0.2
done
for a in {archives}; do ctr --namespace k8s.io images import "$a"; done
exec '{kubelet}' --config='{dir}/kubelet.yaml' --kubeconfig='{dir}/kubeconfig' \
  --root-dir='{dir}/kubelet' --cert-dir='{dir}/kubelet/pki' \
  --hostname-override={name} --node-ip={ip} --v=1
"#,
            name = node.name,
            flavor = paths.flavor,
            tops = paths
                .tops
                .iter()
                .enumerate()
                .map(|(i, t)| format!("overlay {t} '{}/overlay/top-{i}' {t}", dir.display()))
                .collect::<Vec<_>>()
                .join("\n"),
            conf = paths.conf,
            bin = paths.bin,
            conf_file = paths.conf_file,
            cg = node.netns,
            dir = dir.display(),
            archives = archives.join(" "),
            kubelet = node_bins.path("kubelet").display(),
            containerd_log = containerd_log.display(),
            ip = node.ip(),
        );
        let path = dir.join("run.sh");
        std::fs::write(&path, script)?;
        Ok(path)
    }

    /// Every node Ready, with no taint left (the node lifecycle controller removes
    /// `node.kubernetes.io/not-ready` once the kubelet reports Ready).
    fn wait_nodes_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let nodes = self.kubectl_json(&["get", "nodes"])?;
            let waiting: Vec<String> = self
                .state
                .nodes
                .iter()
                .filter(|n| !node_ready(&nodes, &n.name))
                .map(|n| n.name.clone())
                .collect();
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let tails: Vec<String> = waiting
                    .iter()
                    .map(|n| {
                        format!(
                            "{n}: {}",
                            agent::log_tail(&self.component_log(&component(n)), 15)
                        )
                    })
                    .collect();
                bail!(
                    "nodes {waiting:?} not Ready and schedulable within {timeout:?}; {}",
                    tails.join("; ")
                );
            }
            thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Whether the Node `name` in a `kubectl get nodes -o json` list is Ready and untainted.
fn node_ready(list: &Value, name: &str) -> bool {
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["metadata"]["name"] == name)
        .any(|n| {
            let ready = n["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            let tainted = n["spec"]["taints"]
                .as_array()
                .is_some_and(|t| !t.is_empty());
            ready && !tainted
        })
}

/// The node's `cgroupRoot` in every hierarchy (cpuset's needs its CPUs and memory nodes).
fn create_cgroups(name: &str) -> Result<()> {
    for h in HIERARCHIES {
        let dir = Path::new(CGROUP_FS).join(h).join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if *h == "cpuset" {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let parent = std::fs::read_to_string(Path::new(CGROUP_FS).join(h).join(f))?;
                std::fs::write(dir.join(f), parent.trim())
                    .with_context(|| format!("writing {}", dir.join(f).display()))?;
            }
        }
    }
    Ok(())
}

/// cgroups of this lab's nodes that still exist, in any hierarchy (none after `lab down`).
pub fn cgroups_left(names: &Names) -> Vec<PathBuf> {
    HIERARCHIES
        .iter()
        .chain(&["unified"])
        .flat_map(|h| owned_cgroups(names, h))
        .collect()
}

/// The top-level cgroups named after this lab's nodes in one hierarchy.
fn owned_cgroups(names: &Names, hierarchy: &str) -> Vec<PathBuf> {
    std::fs::read_dir(Path::new(CGROUP_FS).join(hierarchy))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(|n| names.owns_pin(n)))
        .map(|e| e.path())
        .collect()
}

/// Kills every process of this lab's nodes (by their `pids` cgroups) and removes the nodes'
/// cgroups in every hierarchy; returns how many processes it killed.
pub fn remove_cgroups(names: &Names) -> usize {
    let mut killed = 0;
    for root in owned_cgroups(names, "pids") {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = procs_below(&root);
            if pids.is_empty() || Instant::now() >= deadline {
                break;
            }
            for &pid in &pids {
                // SAFETY: plain syscall.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            killed += pids.len();
            thread::sleep(Duration::from_millis(100));
        }
    }
    // runc also mirrors the tree into the cgroup v2 hierarchy of this hybrid layout.
    for root in cgroups_left(names) {
        remove_tree(&root);
    }
    killed
}

/// The pids in a cgroup and all its descendants.
fn procs_below(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for e in std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
    {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            pids.extend(procs_below(&e.path()));
        }
    }
    pids
}

/// rmdir a cgroup after its children (cgroup directories are removed with rmdir, not unlink).
fn remove_tree(dir: &Path) {
    for e in std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
    {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path());
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        eprintln!("warning: removing cgroup {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_ready_only_when_ready_and_untainted() {
        let list = |status: &str, taints: Value| {
            json!({"items": [{"metadata": {"name": "node-1"}, "spec": {"taints": taints},
                "status": {"conditions": [{"type": "Ready", "status": status}]}}]})
        };
        assert!(node_ready(&list("True", Value::Null), "node-1"));
        assert!(!node_ready(&list("False", Value::Null), "node-1"));
        assert!(!node_ready(
            &list(
                "True",
                json!([{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}])
            ),
            "node-1"
        ));
        assert!(!node_ready(&list("True", Value::Null), "node-2"));
    }
}

/// Where the node's runtime finds its CNI configuration and plugins: kind's places for the
/// point-to-point shape (kindnet), k3s's for the bridge (flannel) — the host paths of the
/// DaemonSet's CNI volumes in `deploy/`.
struct NodeCniPaths {
    flavor: &'static str,
    conf: &'static str,
    bin: &'static str,
    conf_file: &'static str,
    /// Existing directories that get an overlay so the two above can be made.
    tops: &'static [&'static str],
}

impl NodeCniPaths {
    fn of(shape: CniShape) -> Self {
        match shape {
            CniShape::Ptp => Self {
                flavor: "kind",
                conf: "/etc/cni/net.d",
                bin: "/opt/cni/bin",
                conf_file: "10-kindnet.conflist",
                tops: &["/etc", "/opt"],
            },
            CniShape::Bridge => Self {
                flavor: "k3s",
                conf: "/var/lib/rancher/k3s/agent/etc/cni/net.d",
                bin: "/var/lib/rancher/k3s/data/cni",
                conf_file: "10-flannel.conflist",
                tops: &["/var/lib"],
            },
        }
    }
}

/// What [`Lab::first_packets`] counted.
#[derive(Clone, Debug)]
pub struct FirstPackets {
    /// Datagrams each sender sent, as it logged.
    pub sent: u64,
    /// Of the default-deny pod's: how many reached `ext`.
    pub denied_passed: u64,
    /// Of the unrestricted pod's: how many reached `ext` (shows the receiver hears pods).
    pub open_arrived: u64,
}

const FIRST_PACKET_PORT: u16 = 39999;
const FIRST_PACKET_MS: u64 = 2000;

impl Lab {
    /// New pods that send from their first instant (the `first-packet` image): one in a
    /// namespace whose policy denies all egress, one in a namespace without policy, each sending
    /// UDP to `ext` for two seconds from the moment its container starts. Counts what arrives
    /// at `ext`, then removes both namespaces.
    pub fn first_packets(&self) -> Result<FirstPackets> {
        use std::{
            collections::BTreeMap,
            net::UdpSocket,
            sync::{
                Arc, Mutex,
                atomic::{AtomicBool, Ordering},
            },
        };
        let socket = super::net::in_netns(&self.names.ext_ns(), || {
            UdpSocket::bind((topo::EXT_IP, FIRST_PACKET_PORT))
        })??;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let counts = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let receiver = {
            let (counts, stop) = (counts.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]);
                        let tag = text.split(' ').next().unwrap_or_default().to_string();
                        *counts
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(tag)
                            .or_default() += 1;
                    }
                }
            })
        };
        let pod = |ns: &str, name: &str| {
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"restartPolicy": "Never", "containers": [{
                    "name": "send", "image": images::FIRST_PACKET_IMAGE, "imagePullPolicy": "Never",
                    "args": [topo::EXT_IP.to_string(), FIRST_PACKET_PORT.to_string(),
                             FIRST_PACKET_MS.to_string()],
                }]},
            })
        };
        let docs = [
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "first-packet-deny"}}),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "first-packet-open"}}),
            json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "deny-egress", "namespace": "first-packet-deny"},
                "spec": {"podSelector": {}, "policyTypes": ["Egress"]},
            }),
            pod("first-packet-deny", "sender-deny"),
            pod("first-packet-open", "sender-open"),
        ];
        let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
        let outcome = (|| -> Result<u64> {
            self.kubectl(&["apply", "-f", "-"], Some(&list.to_string()))?;
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut sent = Vec::new();
            for (ns, name) in [
                ("first-packet-deny", "sender-deny"),
                ("first-packet-open", "sender-open"),
            ] {
                loop {
                    let logs = self
                        .kubectl(&["logs", "-n", ns, name], None)
                        .unwrap_or_default();
                    if let Some(n) = logs
                        .lines()
                        .find_map(|l| l.strip_prefix("first-packet: sent "))
                        .and_then(|l| l.split(',').next())
                        .and_then(|n| n.trim().parse::<u64>().ok())
                    {
                        sent.push(n);
                        break;
                    }
                    if Instant::now() > deadline {
                        let described = self
                            .kubectl(&["describe", "pod", "-n", ns, name], None)
                            .unwrap_or_default();
                        bail!("pod {ns}/{name} did not finish sending within 120 s:\n{described}");
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            Ok(sent.into_iter().min().unwrap_or(0))
        })();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let _ = receiver.join();
        let _ = self.kubectl(
            &[
                "delete",
                "namespace",
                "first-packet-deny",
                "first-packet-open",
                "--wait=false",
            ],
            None,
        );
        let sent = outcome?;
        let counts = counts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Ok(FirstPackets {
            sent,
            denied_passed: counts.get("sender-deny").copied().unwrap_or(0),
            open_arrived: counts.get("sender-open").copied().unwrap_or(0),
        })
    }

    /// `policy_agent_cni_attach_duration_seconds` summed over every node's agent: (seconds,
    /// count).
    pub fn cni_attach_totals(&self) -> Result<(f64, u64)> {
        let mut attach = (0.0, 0);
        for node in &self.state.nodes {
            let (_, text) = super::net::in_netns(&node.netns, || {
                agent::http_get(
                    std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 9965)),
                    "/metrics",
                    Duration::from_secs(2),
                )
            })??;
            for line in text.lines() {
                let value = |name: &str| {
                    line.strip_prefix(name)
                        .and_then(|v| v.trim().parse::<f64>().ok())
                };
                if let Some(v) = value("policy_agent_cni_attach_duration_seconds_sum ") {
                    attach.0 += v;
                }
                if let Some(v) = value("policy_agent_cni_attach_duration_seconds_count ") {
                    attach.1 += v as u64;
                }
            }
        }
        Ok(attach)
    }
}
