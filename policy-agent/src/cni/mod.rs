//! CNI chaining: no window between a pod's first packet and its enforcement.
//!
//! Without this, a new pod's host veth exists (the CNI plugin made it) and its containers can send
//! before the agent has learnt the pod's address from the API (`status.podIPs`, which the kubelet
//! writes after the sandbox is up) and attached to the veth: those first packets pass unpoliced.
//!
//! `policy-agent-cni` closes the window. It is the agent's own binary under another name
//! (`main` dispatches on `argv[0]`), installed by the agent into the node's CNI binary directory
//! and appended to the node's CNI configuration list after the plugin that makes the interface
//! (kindnet's `ptp`, flannel's `bridge`) — see [`chain`]. During CNI ADD it hands the pod's name,
//! the addresses and host interfaces of the previous plugin's result to the agent over a Unix
//! socket ([`ATTACH_PATH`]) and returns only once the agent answers that the pod's endpoint is
//! attached and programmed; the runtime starts no container before ADD returns. When the agent
//! cannot (not running, a selected pod it cannot program, no answer within the configured
//! timeout), ADD fails with a CNI error naming why, the runtime tears the sandbox down and the
//! kubelet retries: the pod fails closed, loudly, in its events.
//!
//! Until the API reports `status.podIPs` with the addresses the CNI gave, the agent treats the
//! announced addresses as the pod's ([`pending::Announcements::overlay`]).

pub mod chain;
pub mod pending;
pub mod plugin;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The plugin's `type` in a CNI configuration list, and its binary's name.
pub const PLUGIN_TYPE: &str = "policy-agent-cni";
/// Where the agent listens for the plugin unless told otherwise (a host path: the DaemonSet
/// mounts this directory from the node).
pub const DEFAULT_SOCKET: &str = "/run/policy-agent-cni/cni.sock";
/// How long ADD waits for the agent unless the configuration says otherwise.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 10;

/// `POST` with an [`AttachRequest`] body: answers 200 with an [`AttachReply`] once the pod's
/// endpoint is attached and programmed, or an error status with the reason as text.
pub const ATTACH_PATH: &str = "/cni/attach";
/// `POST`, no body: 200 once the agent has enforced its first complete sync (CNI STATUS).
pub const STATUS_PATH: &str = "/cni/status";
/// `POST` with a [`DetachRequest`] body: forgets the addresses announced for a sandbox.
pub const DETACH_PATH: &str = "/cni/detach";

/// A new pod sandbox, as CNI ADD (or CHECK) describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRequest {
    /// `K8S_POD_NAMESPACE` / `K8S_POD_NAME` of `CNI_ARGS`.
    pub namespace: String,
    pub name: String,
    /// `CNI_CONTAINERID`: the sandbox.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// The addresses of the previous plugin's result (`ips[].address`, without the prefix).
    pub ips: Vec<IpAddr>,
    /// Interfaces of the previous result outside the sandbox (the host veth; on a bridge, the
    /// bridge too).
    pub host_interfaces: Vec<String>,
    /// How long the plugin waits for the answer.
    pub timeout_ms: u64,
}

/// The endpoint the agent enforces for an [`AttachRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachReply {
    /// `namespace/name`.
    pub endpoint: String,
    pub ifindex: u32,
    pub ifname: String,
    /// From the request's arrival to the answer, in the agent.
    pub waited_ms: u64,
}

/// CNI DEL of a sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachRequest {
    pub namespace: String,
    pub name: String,
    pub container_id: String,
}

/// `policy-agent cni …`: maintenance of the chain on a node.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "policy-agent cni")]
pub struct CniArgs {
    #[command(subcommand)]
    pub command: CniCommand,
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum CniCommand {
    /// Remove policy-agent-cni from every configuration list in the directory (and its binary),
    /// before removing the DaemonSet: otherwise new pods on the node wait for an agent that no
    /// longer runs.
    Uninstall {
        /// The node's CNI configuration directory (kind: /etc/cni/net.d; k3s:
        /// /var/lib/rancher/k3s/agent/etc/cni/net.d).
        #[arg(long)]
        cni_conf_dir: std::path::PathBuf,
        /// The node's CNI binary directory, to remove the plugin binary from.
        #[arg(long)]
        cni_bin_dir: Option<std::path::PathBuf>,
    },
}

/// Runs a `policy-agent cni` command; returns what to print.
pub fn run(args: &CniArgs) -> Result<String, chain::ChainError> {
    match &args.command {
        CniCommand::Uninstall {
            cni_conf_dir,
            cni_bin_dir,
        } => {
            let changed = chain::uninstall(cni_conf_dir)?;
            let mut out: Vec<String> = changed
                .iter()
                .map(|f| format!("removed policy-agent-cni from {}", f.display()))
                .collect();
            if let Some(dir) = cni_bin_dir {
                let bin = dir.join(PLUGIN_TYPE);
                match std::fs::remove_file(&bin) {
                    Ok(()) => out.push(format!("removed {}", bin.display())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(chain::ChainError::Write { file: bin, source }),
                }
            }
            if out.is_empty() {
                out.push(format!(
                    "policy-agent-cni is not chained in {}",
                    cni_conf_dir.display()
                ));
            }
            Ok(out.join("\n"))
        }
    }
}
