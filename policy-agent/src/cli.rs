//! Command-line flags of `policy-agent`. Every flag has an environment fallback so the DaemonSet can
//! set it either way. Kept in the library so deployment manifests can be checked against it.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the agent serves its control socket unless told otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/policy-agent/control.sock";

/// Enforces Kubernetes NetworkPolicy with eBPF on this node.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "policy-agent",
    version,
    after_help = "Talk to a running agent on this node: policy-agent control --help"
)]
pub struct Args {
    /// This node's name (the DaemonSet sets it from the downward API, `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Read Namespaces, Pods, Services and NetworkPolicies from this directory of YAML manifests
    /// (multi-document, watched for changes) instead of the Kubernetes API.
    #[arg(long, env = "POLICY_AGENT_MANIFEST_DIR")]
    pub manifest_dir: Option<PathBuf>,

    /// kubeconfig for the Kubernetes source; in-cluster config or $KUBECONFIG when absent.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// bpffs directory where programs, links and maps are pinned (adopted on restart).
    #[arg(
        long,
        env = "POLICY_AGENT_BPFFS_DIR",
        default_value = "/sys/fs/bpf/policy-agent"
    )]
    pub bpffs_dir: PathBuf,

    /// Address of the read-only HTTP server: /healthz, /readyz, /metrics, /status. The default
    /// `[::]` serves IPv4 and IPv6 (IPv4 only where the kernel has no IPv6).
    #[arg(long, env = "POLICY_AGENT_HTTP_ADDR", default_value = "[::]:9965")]
    pub http_addr: SocketAddr,

    /// Unix socket of the control server: /loglevel (read and change the log filter) and
    /// /status. Only root can connect (mode 0600); `policy-agent control` is its client.
    #[arg(
        long,
        env = "POLICY_AGENT_CONTROL_SOCKET",
        default_value = DEFAULT_CONTROL_SOCKET
    )]
    pub control_socket: PathBuf,

    /// This node's own addresses (always allowed into local pods), IPv4 and IPv6 alike, comma
    /// separated or repeated. Discovered from the node's interfaces when not given; the Node
    /// object's addresses are added either way. Loopback, multicast and IPv6 link-local
    /// (fe80::/10) addresses are refused: they name no node.
    #[arg(
        long = "node-ip",
        env = "POLICY_AGENT_NODE_IPS",
        value_delimiter = ',',
        value_parser = parse_node_ip
    )]
    pub node_ips: Vec<IpAddr>,

    /// Devices where post-DNAT egress decisions for Service traffic to other nodes are made (uplink
    /// and tunnel devices). Default: the devices of the default routes and of routes through a
    /// gateway, plus flannel's tunnels (flannel.1, flannel-v6.1, flannel-wg, flannel-wg-v6) when
    /// present.
    #[arg(long = "uplink", env = "POLICY_AGENT_UPLINKS", value_delimiter = ',')]
    pub uplinks: Vec<String>,

    /// Bits of skb->mark used to carry the source endpoint of Service traffic to the post-DNAT
    /// hook. Must not overlap kube-proxy's 0x4000 (masquerade) and 0x8000 (drop) bits, nor marks
    /// other netfilter rules of the node use (checked at run time: policy_agent_mark_mask_conflicts;
    /// on k3s with kube-router's NetworkPolicy controller, 0x10000/0x20000: use 0xfff00000).
    #[arg(long, env = "POLICY_AGENT_MARK_MASK", default_value = "0x0fff0000", value_parser = parse_mask)]
    pub mark_mask: u32,

    /// How often the manifest directory is checked for changes (file sizes and mtimes).
    #[arg(long, env = "POLICY_AGENT_MANIFEST_POLL_MS", default_value_t = 20)]
    pub manifest_poll_ms: u64,

    /// Wait this long after a change for more before recompiling.
    #[arg(long, env = "POLICY_AGENT_DEBOUNCE_MS", default_value_t = 20)]
    pub debounce_ms: u64,

    /// Log format.
    #[arg(long, env = "POLICY_AGENT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax); reloadable through the HTTP server.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,

    /// Log one line per verdict event (drops always; allowed new flows too with
    /// --flow-log-allowed).
    #[arg(long, env = "POLICY_AGENT_FLOW_LOG")]
    pub flow_log: bool,

    /// Include allowed new flows in the flow log.
    #[arg(long, env = "POLICY_AGENT_FLOW_LOG_ALLOWED")]
    pub flow_log_allowed: bool,

    /// How many recent flows (allowed and dropped) the agent keeps for `GET /flows`; 0 keeps
    /// none and, without the flow log or audit, stops the kernel's verdict events.
    #[arg(long, env = "POLICY_AGENT_FLOW_RECORDS", default_value_t = crate::flowstore::DEFAULT_CAPACITY)]
    pub flow_records: usize,

    /// Serve `GET /flows` and `GET /explain` on --http-addr as well as on the control socket.
    /// Anyone who reaches that port (with hostNetwork: any pod that reaches the node) can then
    /// read this node's flows and explain flows against its maps; it is what `kubectl netpol
    /// flows --cluster` and `explain --live --cluster` read through the API server's pod proxy.
    #[arg(long, env = "POLICY_AGENT_HTTP_FLOWS")]
    pub http_flows: bool,

    /// On shutdown, detach programs and remove pins instead of leaving enforcement in place.
    #[arg(long, env = "POLICY_AGENT_CLEANUP_ON_EXIT")]
    pub cleanup_on_exit: bool,

    /// Serve the chained CNI plugin (`policy-agent-cni`) on this Unix socket: a pod's CNI ADD
    /// returns once its endpoint is enforced. A path on the node (mode 0600, root only).
    #[arg(long, env = "POLICY_AGENT_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,

    /// Keep `policy-agent-cni` chained at the end of the node's CNI configuration list in this
    /// directory (the first configuration file by name, as the runtime picks it), re-adding it
    /// when the CNI rewrites the file. The entry names --cni-socket: mount it at the same path
    /// as on the node.
    #[arg(long, env = "POLICY_AGENT_CNI_CONF_DIR", requires = "cni_socket")]
    pub cni_conf_dir: Option<PathBuf>,

    /// Install the plugin binary (a copy of this executable named policy-agent-cni) into this
    /// directory, where the runtime looks for CNI plugins.
    #[arg(long, env = "POLICY_AGENT_CNI_BIN_DIR", requires = "cni_conf_dir")]
    pub cni_bin_dir: Option<PathBuf>,

    /// How long a pod's CNI ADD waits for its endpoint before failing (the kubelet then retries
    /// the sandbox).
    #[arg(long, env = "POLICY_AGENT_CNI_TIMEOUT_SECONDS", default_value_t = crate::cni::DEFAULT_TIMEOUT_SECONDS)]
    pub cni_timeout_seconds: u64,
}

/// Why a `--node-ip` value is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeIpError {
    #[error("{0:?} is not an IP address")]
    NotAnAddress(String),
    #[error("{ip} is {reason}, not a node address")]
    NotANodeAddress {
        ip: IpAddr,
        reason: crate::model::NotNodeAddress,
    },
}

/// One `--node-ip` entry: an IPv4 or IPv6 address (blanks around it ignored) that can be a node
/// address ([`crate::model::node_address`]).
fn parse_node_ip(s: &str) -> Result<IpAddr, NodeIpError> {
    let ip: IpAddr = s
        .trim()
        .parse()
        .map_err(|_| NodeIpError::NotAnAddress(s.to_owned()))?;
    crate::model::node_address(ip).map_err(|reason| NodeIpError::NotANodeAddress { ip, reason })
}

fn parse_mask(s: &str) -> Result<u32, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("mark mask {s:?}: {e}"))?;
    if v & 0xc000 != 0 {
        return Err(format!(
            "mark mask {v:#x} overlaps kube-proxy's 0x4000/0x8000 bits"
        ));
    }
    if v.count_ones() < 12 {
        return Err(format!(
            "mark mask {v:#x} has fewer than 12 bits (4095 endpoints)"
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(["policy-agent", "--node-name", "n1"].iter().chain(args))
    }

    #[test]
    fn node_ip_takes_both_families_in_one_list() {
        let args = parse(&[
            "--node-ip",
            "172.18.0.2,fc00:f853:ccd:e793::2",
            "--node-ip",
            "2001:db8::7, 10.0.0.1",
        ])
        .unwrap();
        let want: Vec<IpAddr> = [
            "172.18.0.2",
            "fc00:f853:ccd:e793::2",
            "2001:db8::7",
            "10.0.0.1",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(args.node_ips, want);
        assert!(parse(&[]).unwrap().node_ips.is_empty());
        // The environment variable is read with the same delimiter and parser.
        let cmd = Args::command();
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == "node_ips")
            .unwrap();
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            Some("POLICY_AGENT_NODE_IPS")
        );
        assert_eq!(arg.get_value_delimiter(), Some(','));
    }

    #[test]
    fn node_ip_refuses_what_names_no_node() {
        for (value, want) in [
            ("fe80::1", "fe80::1 is an IPv6 link-local address"),
            ("::1", "::1 is a loopback address"),
            ("127.0.0.1", "127.0.0.1 is a loopback address"),
            ("0.0.0.0", "0.0.0.0 is the unspecified address"),
            ("ff02::1", "ff02::1 is a multicast address"),
            ("10.0.0.1/24", "\"10.0.0.1/24\" is not an IP address"),
            ("[fd00::1]", "\"[fd00::1]\" is not an IP address"),
        ] {
            let err = parse(&["--node-ip", &format!("10.0.0.1,{value}")]).unwrap_err();
            assert!(err.to_string().contains(want), "{value}: {err}");
        }
        assert_eq!(
            parse_node_ip("fe80::1%eth0"),
            Err(NodeIpError::NotAnAddress("fe80::1%eth0".into()))
        );
        assert_eq!(
            parse_node_ip("fe80::1"),
            Err(NodeIpError::NotANodeAddress {
                ip: "fe80::1".parse().unwrap(),
                reason: crate::model::NotNodeAddress::LinkLocal
            })
        );
    }
}
