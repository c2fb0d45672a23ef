//! The lab's lifecycle and persistent state: `up` builds the network namespaces and starts the
//! agents, `sync` publishes objects to the agents and waits for them, `down` removes everything the
//! lab made — from the state file when there is one, and by name patterns, network-namespace
//! membership and command lines when there is not (after a crash).

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    networking::v1::NetworkPolicy,
};
use policy_common::status::REVISION_FILE;
use serde::{Deserialize, Serialize};

use super::{
    agent::{self, AgentRef},
    net::{self, NetnsMode},
    serve::ServeArgs,
    services,
    topology::{self as topo, Family, IpFamily, Names},
};

/// Everything the lab remembers between commands (`<target>/lab/<prefix>/state.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub prefix: String,
    /// The address families of every pod, node, Service and `ext`.
    #[serde(default)]
    pub ip_family: IpFamily,
    pub nodes: Vec<NodeState>,
    /// None: the lab runs without enforcement (`up --no-agent`).
    pub agent_bin: Option<PathBuf>,
    pub revision: u64,
    pub ext_pid: Option<u32>,
    pub next_pod_id: u32,
    /// Offset of the last ClusterIP handed out inside the service range.
    pub last_service_offset: u32,
    pub namespaces: BTreeMap<String, Namespace>,
    /// By `ns/name`.
    pub pods: BTreeMap<String, PodState>,
    pub services: BTreeMap<String, Service>,
    pub policies: BTreeMap<String, NetworkPolicy>,
    /// The service ruleset last loaded on the nodes.
    pub nft: String,
    /// EndpointSlices written to the manifest directory, by file name.
    #[serde(default)]
    pub endpoint_slices: BTreeMap<String, serde_json::Value>,
    /// The real control plane (`up --api kube`); None in the manifest mode.
    #[serde(default)]
    pub kube: Option<super::kube::KubeState>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeState {
    pub number: u32,
    pub name: String,
    /// Every address of the node, IPv4 first (the first is of the lab's primary family).
    pub ips: Vec<IpAddr>,
    pub netns: String,
    pub http_port: u16,
    pub agent_pid: Option<u32>,
    /// Last host byte handed out in the node's pod range (round robin, as host-local IPAM).
    pub last_pod_host: u8,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodState {
    /// The object as the agents see it (nodeName and status filled in).
    pub pod: Pod,
    pub id: u32,
    pub node: u32,
    /// `status.podIPs`, IPv4 first (empty until the pod's network is set up).
    pub ips: Vec<IpAddr>,
    pub netns: String,
    pub veth: String,
    pub responder_pid: Option<u32>,
}

impl NodeState {
    /// The node's address of the lab's primary family (its InternalIP, the agent's HTTP
    /// address).
    pub fn ip(&self) -> IpAddr {
        self.ips[0]
    }
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip(), self.http_port)
    }
}

impl PodState {
    /// `status.podIP`: the address of the lab's primary family.
    pub fn ip(&self) -> IpAddr {
        self.ips[0]
    }

    /// The pod's address of family `f`.
    pub fn addr(&self, f: Family) -> Option<IpAddr> {
        self.ips.iter().copied().find(|ip| Family::of(*ip) == f)
    }
}

/// Files of one lab.
#[derive(Clone, Debug)]
pub struct Paths {
    pub dir: PathBuf,
    pub lock: PathBuf,
}

impl Paths {
    pub fn new(prefix: &str) -> Self {
        let base = target_dir().join("lab");
        Self {
            dir: base.join(prefix),
            lock: base.join(format!("{prefix}.lock")),
        }
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn manifests(&self) -> PathBuf {
        self.dir.join("manifests")
    }
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
    /// The control socket of `node`'s agent (`policy-agent control --control-socket …`).
    pub fn control_socket(&self, node: &str) -> PathBuf {
        self.dir.join("control").join(format!("{node}.sock"))
    }
    /// Where `node`'s agent serves the chained CNI plugin (the real-API mode's pods go through
    /// it).
    pub fn cni_socket(&self, node: &str) -> PathBuf {
        self.dir.join("cni").join(format!("{node}.sock"))
    }
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => agent::workspace_root().join("target"),
    }
}

/// Which agent binary `up` runs.
#[derive(Clone, Debug)]
pub enum AgentChoice {
    /// `cargo build --release -p policy-agent`.
    Build,
    Binary(PathBuf),
    /// No enforcement (every probe connects): a baseline, or development without an agent.
    None,
    /// The reference implementation `sigs.k8s.io/kube-network-policies` on every node instead of
    /// policy-agent (real-API mode only).
    KubeNetworkPolicies,
}

#[derive(Clone, Debug)]
pub struct UpOptions {
    pub nodes: u32,
    pub agent: AgentChoice,
    pub api: super::kube::ApiMode,
    /// kube-proxy's mode (real-API mode only).
    pub kube_proxy: super::kube::ProxyMode,
    /// The CNI chain of the real-API mode's pods.
    pub cni: super::kube::CniShape,
    /// Real kubelets and containerd run the nodes (real-API mode only); the agent binary goes
    /// into the DaemonSet's image instead of running as a lab process.
    pub kubelet: bool,
    /// The address families of the lab.
    pub ip_family: IpFamily,
}

impl UpOptions {
    /// `nodes` nodes running `agent`, in the mode `LAB_API` / `LAB_KUBE_PROXY` name (default:
    /// the manifest directory).
    pub fn new(nodes: u32, agent: AgentChoice) -> Result<UpOptions> {
        use clap::ValueEnum;
        let pick = |var: &str| -> Result<Option<String>> {
            match std::env::var(var) {
                Ok(v) if !v.is_empty() => Ok(Some(v)),
                _ => Ok(None),
            }
        };
        let api = match pick("LAB_API")? {
            Some(v) => super::kube::ApiMode::from_str(&v, true)
                .map_err(|_| anyhow!("LAB_API={v:?}: expected manifests or kube"))?,
            None => super::kube::ApiMode::default(),
        };
        let kube_proxy = match pick("LAB_KUBE_PROXY")? {
            Some(v) => super::kube::ProxyMode::from_str(&v, true)
                .map_err(|_| anyhow!("LAB_KUBE_PROXY={v:?}: expected iptables or nftables"))?,
            None => super::kube::ProxyMode::default(),
        };
        let cni = match pick("LAB_CNI")? {
            Some(v) => super::kube::CniShape::from_str(&v, true)
                .map_err(|_| anyhow!("LAB_CNI={v:?}: expected ptp or bridge"))?,
            None => super::kube::CniShape::default(),
        };
        let ip_family = match pick("LAB_IP_FAMILY")? {
            Some(v) => IpFamily::from_str(&v, true)
                .map_err(|_| anyhow!("LAB_IP_FAMILY={v:?}: expected ipv4, ipv6 or dual"))?,
            None => IpFamily::default(),
        };
        Ok(UpOptions {
            nodes,
            agent,
            api,
            kube_proxy,
            cni,
            kubelet: false,
            ip_family,
        })
    }
}

/// A lab that is up, locked for the duration of one command.
pub struct Lab {
    pub names: Names,
    pub paths: Paths,
    pub state: State,
    pub converge_timeout: Duration,
    _lock: File,
}

fn lock(paths: &Paths) -> Result<File> {
    if let Some(parent) = paths.lock.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&paths.lock)
        .with_context(|| format!("opening {}", paths.lock.display()))?;
    // SAFETY: plain syscall on a valid descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!(
            "locking {}: {}",
            paths.lock.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(f)
}

/// The outcome of one published change.
#[derive(Clone, Debug)]
pub struct Converged {
    pub revision: u64,
    /// None without agents.
    pub took: Option<Duration>,
    pub agents: usize,
    pub warnings: Vec<String>,
}

impl std::fmt::Display for Converged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.took {
            Some(t) => write!(
                f,
                "revision {} enforced by {}/{} agents in {} ms",
                self.revision,
                self.agents,
                self.agents,
                t.as_millis()
            ),
            None => write!(
                f,
                "revision {} written (no agents: nothing is enforced)",
                self.revision
            ),
        }
    }
}

impl Lab {
    /// Opens the lab with this prefix; fails when it is not up.
    pub fn open(prefix: &str) -> Result<Lab> {
        topo::check_prefix(prefix)?;
        let paths = Paths::new(prefix);
        let lock = lock(&paths)?;
        let text = std::fs::read_to_string(paths.state()).map_err(|_| {
            anyhow!(
                "no lab {prefix:?} is up (no {}); run `cargo xtask lab up` first",
                paths.state().display()
            )
        })?;
        let state: State = serde_json::from_str(&text).with_context(|| {
            format!(
                "reading {}; `cargo xtask lab down` cleans up",
                paths.state().display()
            )
        })?;
        Ok(Lab {
            names: Names::new(prefix),
            paths,
            state,
            converge_timeout: Duration::from_secs(30),
            _lock: lock,
        })
    }

    /// Builds the lab: underlay, off-cluster host, nodes, agents.
    pub fn up(prefix: &str, opts: &UpOptions) -> Result<Lab> {
        topo::check_prefix(prefix)?;
        if !(1..=topo::MAX_NODES).contains(&opts.nodes) {
            bail!("--nodes must be between 1 and {}", topo::MAX_NODES);
        }
        let paths = Paths::new(prefix);
        let lock = lock(&paths)?;
        if paths.state().exists() {
            bail!(
                "lab {prefix:?} is already up ({}); run `cargo xtask lab down` first",
                paths.state().display()
            );
        }
        let names = Names::new(prefix);
        let leftovers = teardown(&names, &paths);
        if !leftovers.is_empty() {
            eprintln!(
                "cleaned up leftovers of an earlier lab {prefix:?}: {}",
                leftovers.summary()
            );
        }
        if opts.ip_family != IpFamily::Ipv4 && opts.kubelet {
            bail!(
                "--ip-family {} is not available with --kubelet: the lab's real nodes run IPv4 clusters only",
                opts.ip_family.as_str()
            );
        }
        if opts.cni != super::kube::CniShape::Ptp && opts.api != super::kube::ApiMode::Kube {
            bail!("--cni bridge needs --api kube (the manifest mode wires pods itself)");
        }
        let mut agent_bin = match &opts.agent {
            AgentChoice::Build => Some(agent::build()?),
            AgentChoice::Binary(p) => {
                if !p.is_file() {
                    bail!("agent binary {} does not exist", p.display());
                }
                Some(std::fs::canonicalize(p)?)
            }
            AgentChoice::None => None,
            AgentChoice::KubeNetworkPolicies => {
                if opts.api != super::kube::ApiMode::Kube {
                    bail!(
                        "--enforcer kube-network-policies needs --api kube (it reads the API server)"
                    );
                }
                None
            }
        };
        let image_bin = if opts.kubelet {
            if opts.api != super::kube::ApiMode::Kube {
                bail!("--kubelet needs --api kube (kubelets register with the API server)");
            }
            Some(agent_bin.take().context(
                "--kubelet needs the agent binary for the DaemonSet's image (not --no-agent)",
            )?)
        } else {
            None
        };
        if agent_bin.is_some() && !net::is_mountpoint(Path::new("/sys/fs/bpf")) {
            net::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
                .context("mounting bpffs at /sys/fs/bpf")?;
        }
        std::fs::create_dir_all(paths.manifests())?;
        std::fs::create_dir_all(paths.logs())?;
        let families = opts.ip_family.families();
        let state = State {
            prefix: prefix.to_string(),
            ip_family: opts.ip_family,
            nodes: (1..=opts.nodes)
                .map(|n| NodeState {
                    number: n,
                    name: topo::node_name(n),
                    ips: families.iter().map(|f| topo::node_addr(n, *f)).collect(),
                    netns: names.node_ns(n),
                    http_port: topo::AGENT_HTTP_PORT_BASE + n as u16,
                    agent_pid: None,
                    last_pod_host: 1,
                })
                .collect(),
            agent_bin,
            revision: 0,
            ext_pid: None,
            next_pod_id: 1,
            last_service_offset: 0,
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            services: BTreeMap::new(),
            policies: BTreeMap::new(),
            nft: String::new(),
            endpoint_slices: BTreeMap::new(),
            kube: None,
        };
        let mut lab = Lab {
            names,
            paths,
            state,
            converge_timeout: Duration::from_secs(30),
            _lock: lock,
        };
        if let Err(e) = lab.build(opts, image_bin.as_deref()) {
            let _ = teardown(&lab.names, &lab.paths);
            return Err(e);
        }
        Ok(lab)
    }

    fn build(&mut self, opts: &UpOptions, image_bin: Option<&Path>) -> Result<()> {
        let n = &self.names;
        let families = self.state.ip_family.families();
        // Underlay router with the node bridge.
        let ul = n.underlay_ns();
        net::add_netns(&ul)?;
        set_families(&ul, self.state.ip_family, true)?;
        let mut ul_cmds = vec![
            "link set lo up".to_string(),
            format!("link add {} type bridge", n.bridge()),
            format!("link set {} up", n.bridge()),
        ];
        for &f in families {
            ul_cmds.push(format!(
                "addr add {}/{} dev {}{}",
                topo::node_gateway(f),
                topo::node_cidr(f).len,
                n.bridge(),
                nodad(f)
            ));
        }
        net::ip_batch(&ul, &ul_cmds)?;
        // The off-cluster host.
        let ext = n.ext_ns();
        net::add_netns(&ext)?;
        set_families(&ext, self.state.ip_family, false)?;
        let mut ul_cmds = vec![format!(
            "link add {} type veth peer name eth0 netns {ext}",
            n.ext_link()
        )];
        let mut ext_cmds = vec!["link set lo up".to_string()];
        for &f in families {
            let (ip, len, gw) = topo::ext_addr(f);
            ul_cmds.push(format!(
                "addr add {gw}/{len} dev {}{}",
                n.ext_link(),
                nodad(f)
            ));
            ext_cmds.push(format!("addr add {ip}/{len} dev eth0{}", nodad(f)));
        }
        ul_cmds.push(format!("link set {} up", n.ext_link()));
        ext_cmds.push("link set eth0 up".into());
        for &f in families {
            ext_cmds.push(format!("route add default via {}", topo::ext_addr(f).2));
        }
        net::ip_batch(&ul, &ul_cmds)?;
        net::ip_batch(&ext, &ext_cmds)?;
        // Nodes.
        let count = self.state.nodes.len() as u32;
        for node in &self.state.nodes {
            let num = node.number;
            net::add_netns(&node.netns)?;
            set_families(&node.netns, self.state.ip_family, true)?;
            let mut ul_cmds = vec![
                format!(
                    "link add {} type veth peer name eth0 netns {}",
                    n.node_link(num),
                    node.netns
                ),
                format!("link set {} master {}", n.node_link(num), n.bridge()),
                format!("link set {} up", n.node_link(num)),
            ];
            let mut node_cmds = vec!["link set lo up".to_string()];
            for &f in families {
                node_cmds.push(format!(
                    "addr add {}/{} dev eth0{}",
                    topo::node_addr(num, f),
                    topo::node_cidr(f).len,
                    nodad(f)
                ));
            }
            node_cmds.push("link set eth0 up".into());
            for &f in families {
                node_cmds.push(format!("route add default via {}", topo::node_gateway(f)));
                // Addresses of the node's own range without a pod are unreachable, not looped.
                node_cmds.push(format!("route add unreachable {}", topo::node_pods(num, f)));
                for other in (1..=count).filter(|o| *o != num) {
                    node_cmds.push(format!(
                        "route add {} via {}",
                        topo::node_pods(other, f),
                        topo::node_addr(other, f)
                    ));
                }
            }
            net::ip_batch(&ul, &ul_cmds)?;
            net::ip_batch(&node.netns, &node_cmds)?;
            ul_cmds.clear();
            for &f in families {
                ul_cmds.push(format!(
                    "route add {} via {}",
                    topo::node_pods(num, f),
                    topo::node_addr(num, f)
                ));
            }
            net::ip_batch(&ul, &ul_cmds)?;
        }
        self.reload_services(true)?;
        // ext answers TCP and UDP on its ports.
        let ports = topo::EXT_PORTS.to_vec();
        let pid = start_responders(
            &self.names.prefix,
            &[(
                ext.clone(),
                ServeArgs {
                    name: "ext".into(),
                    tcp: ports.clone(),
                    udp: ports,
                    sctp: vec![],
                },
            )],
            &self.paths.logs(),
        )?;
        self.state.ext_pid = pid.first().copied();
        if opts.api == super::kube::ApiMode::Kube {
            // Saved first, so that `down` after a failed start finds the control plane.
            self.save()?;
            self.kube_up(
                opts.kube_proxy,
                matches!(opts.agent, AgentChoice::KubeNetworkPolicies),
                opts.cni,
                image_bin,
            )?;
            if let Some(bin) = self.state.agent_bin.clone() {
                for i in 0..self.state.nodes.len() {
                    let pid = self.start_agent(&bin, i)?;
                    self.state.nodes[i].agent_pid = Some(pid);
                }
            }
            return self.save();
        }
        // The cluster's own objects, then the agents.
        for node in &self.state.nodes {
            write_object(
                &self.paths.manifests(),
                &node_file(&node.name),
                &node_object(node),
            )?;
        }
        self.ensure_namespace("default");
        write_object(
            &self.paths.manifests(),
            &namespace_file("default"),
            &self.state.namespaces["default"],
        )?;
        if let Some(bin) = self.state.agent_bin.clone() {
            for i in 0..self.state.nodes.len() {
                let pid = self.start_agent(&bin, i)?;
                self.state.nodes[i].agent_pid = Some(pid);
            }
        }
        self.save()?;
        Ok(())
    }

    fn start_agent(&self, bin: &Path, i: usize) -> Result<u32> {
        let node = &self.state.nodes[i];
        let mut cmd = Command::new(bin);
        cmd.arg("--node-name").arg(&node.name);
        if self.is_kube() {
            cmd.arg("--kubeconfig")
                .arg(super::kube::agent_kubeconfig(self))
                .arg("--cni-socket")
                .arg(self.paths.cni_socket(&node.name));
        } else {
            cmd.arg("--manifest-dir").arg(self.paths.manifests());
        }
        cmd.arg("--bpffs-dir")
            .arg(self.names.bpffs_dir(node.number))
            .arg("--http-addr")
            .arg(node.http_addr().to_string())
            .arg("--control-socket")
            .arg(self.paths.control_socket(&node.name));
        let log = self.paths.logs().join(format!("agent-{}.log", node.name));
        let child = net::spawn_daemon(cmd, &node.netns, NetnsMode::DaemonWithSysfs, &log)?;
        Ok(child.id())
    }

    /// Node N's addresses, as its pods report them in `hostIPs`.
    pub fn host_ips(&self, node: u32) -> &[IpAddr] {
        self.state
            .nodes
            .iter()
            .find(|n| n.number == node)
            .map(|n| n.ips.as_slice())
            .unwrap_or_default()
    }

    /// The agents, for convergence checks.
    pub fn agents(&self) -> Vec<AgentRef> {
        self.state
            .nodes
            .iter()
            .filter_map(|n| {
                Some(AgentRef {
                    node: n.name.clone(),
                    netns: n.netns.clone(),
                    addr: n.http_addr(),
                    pid: n.agent_pid?,
                    log: self.paths.logs().join(format!("agent-{}.log", n.name)),
                })
            })
            .collect()
    }

    pub fn save(&self) -> Result<()> {
        let tmp = self.paths.dir.join(".state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.state)?)?;
        std::fs::rename(&tmp, self.paths.state())?;
        Ok(())
    }

    /// Publishes the current objects: bumps the revision and waits for every agent to enforce it.
    pub fn publish(&mut self) -> Result<Converged> {
        if self.is_kube() {
            return self.kube_converge();
        }
        self.state.revision += 1;
        let rev = self.state.revision;
        let file = self.paths.manifests().join(REVISION_FILE);
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, format!("{rev}\n"))?;
        std::fs::rename(&tmp, file)?;
        self.save()?;
        let agents = self.agents();
        if agents.is_empty() {
            return Ok(Converged {
                revision: rev,
                took: None,
                agents: 0,
                warnings: vec![],
            });
        }
        let (statuses, took) = agent::wait_converged(&agents, rev, self.converge_timeout)?;
        let warnings = statuses
            .iter()
            .zip(&agents)
            .flat_map(|(s, a)| {
                s.errors
                    .iter()
                    .map(move |e| format!("agent on {}: {e}", a.node))
            })
            .collect();
        Ok(Converged {
            revision: rev,
            took: Some(took),
            agents: agents.len(),
            warnings,
        })
    }

    /// Recomputes Service endpoints: reloads the DNAT ruleset on every node if it changed and
    /// rewrites the EndpointSlices (as the endpoint-slice controller would).
    pub fn reload_services(&mut self, force: bool) -> Result<()> {
        if self.is_kube() {
            // kube-proxy programs the Services, the controller manager publishes the slices.
            return Ok(());
        }
        let views = self.pod_views();
        let ports = services::service_ports(&self.state.services, &views);
        let node_of: BTreeMap<&str, String> = self
            .state
            .pods
            .iter()
            .map(|(k, p)| (k.as_str(), topo::node_name(p.node)))
            .collect();
        let slices = services::endpoint_slices(&ports, &node_of);
        let rules = services::render(&ports, self.state.ip_family.families());
        if force || rules != self.state.nft {
            thread::scope(|s| {
                let handles: Vec<_> = self
                    .state
                    .nodes
                    .iter()
                    .map(|node| s.spawn(|| net::nft(&node.netns, &rules)))
                    .collect();
                handles
                    .into_iter()
                    .try_for_each(|h| h.join().map_err(|_| anyhow!("nft thread panicked"))?)
            })?;
            self.state.nft = rules;
        }
        let dir = self.paths.manifests();
        for (file, slice) in &slices {
            if self.state.endpoint_slices.get(file) != Some(slice) {
                write_object(&dir, file, slice)?;
            }
        }
        for file in self.state.endpoint_slices.keys() {
            if !slices.contains_key(file) {
                remove_object(&dir, file);
            }
        }
        self.state.endpoint_slices = slices;
        Ok(())
    }

    /// Makes sure a namespace object exists (referenced namespaces are created implicitly).
    /// Returns true if it was created.
    pub fn ensure_namespace(&mut self, name: &str) -> bool {
        if self.state.namespaces.contains_key(name) {
            return false;
        }
        let ns = normalize_namespace(
            Namespace {
                metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    name: Some(name.to_string()),
                    ..Default::default()
                },
                ..Default::default()
            },
            None,
        );
        self.state.namespaces.insert(name.to_string(), ns);
        true
    }
}

/// Sets up the address families of a namespace, forwarding them when it routes. Without IPv6 the
/// lab turns it off (router solicitations would be noise on every link), as on a single-stack
/// kind cluster; with IPv6, duplicate address detection and router advertisements are off, so
/// addresses work at once and routes are only the lab's.
pub fn set_families(netns: &str, families: IpFamily, router: bool) -> Result<()> {
    if families.has(Family::V4) && router {
        net::sysctl(netns, "net/ipv4/ip_forward", "1")?;
    }
    if !families.has(Family::V6) {
        for key in [
            "net/ipv6/conf/all/disable_ipv6",
            "net/ipv6/conf/default/disable_ipv6",
        ] {
            // Kernels without IPv6 have no such file; that is fine too.
            let _ = net::sysctl(netns, key, "1");
        }
        return Ok(());
    }
    for conf in ["all", "default"] {
        net::sysctl(netns, &format!("net/ipv6/conf/{conf}/accept_dad"), "0")?;
        net::sysctl(netns, &format!("net/ipv6/conf/{conf}/accept_ra"), "0")?;
        if router {
            net::sysctl(netns, &format!("net/ipv6/conf/{conf}/forwarding"), "1")?;
        }
    }
    Ok(())
}

/// `ip addr add` flag that skips duplicate address detection for IPv6 addresses.
pub fn nodad(f: Family) -> &'static str {
    match f {
        Family::V4 => "",
        Family::V6 => " nodad",
    }
}

/// Starts responders (one process per namespace) and waits until each has bound its ports.
pub fn start_responders(
    prefix: &str,
    jobs: &[(String, ServeArgs)],
    logs: &Path,
) -> Result<Vec<u32>> {
    let exe = std::env::current_exe().context("locating the xtask executable")?;
    let mut children = Vec::new();
    for (netns, args) in jobs {
        let log = logs.join(format!("serve-{netns}.log"));
        let mut cmd = Command::new(&exe);
        cmd.args(["lab", "--prefix", prefix, "serve"])
            .args(args.to_args());
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(err);
        net::set_netns(&mut cmd, netns, NetnsMode::Daemon)?;
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the responder in {netns}"))?;
        children.push((netns, child, log));
    }
    let mut pids = Vec::new();
    let mut failure = None;
    for (netns, mut child, log) in children {
        let mut line = String::new();
        let out = child.stdout.take().expect("piped");
        let _ = BufReader::new(out).read_line(&mut line);
        if line.trim() == "ready" {
            pids.push(child.id());
        } else if failure.is_none() {
            let _ = child.wait();
            failure = Some(anyhow!(
                "the responder in {netns} did not start; {}",
                agent::log_tail(&log, 5)
            ));
        }
    }
    if let Some(e) = failure {
        net::terminate(&pids, libc::SIGKILL, Duration::from_secs(1));
        return Err(e);
    }
    Ok(pids)
}

/// What `down` (or the cleanup before `up`) removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub processes: usize,
    pub netns: usize,
    pub pins: usize,
    pub state: bool,
}

impl Removed {
    pub fn is_empty(&self) -> bool {
        self.processes == 0 && self.netns == 0 && self.pins == 0 && !self.state
    }
    pub fn summary(&self) -> String {
        format!(
            "{} processes, {} network namespaces (with their links), {} bpffs pin directories{}",
            self.processes,
            self.netns,
            self.pins,
            if self.state {
                ", the state directory"
            } else {
                ""
            }
        )
    }
}

/// Stops and removes everything of the lab with this prefix. Works without a state file.
/// cgroups of this lab's real nodes left behind (none after [`down`]).
pub fn node_cgroups_left(prefix: &str) -> Vec<PathBuf> {
    super::nodes::cgroups_left(&Names::new(prefix))
}

pub fn down(prefix: &str) -> Result<Removed> {
    topo::check_prefix(prefix)?;
    let paths = Paths::new(prefix);
    let _lock = lock(&paths)?;
    Ok(teardown(&Names::new(prefix), &paths))
}

/// Processes of this lab: members of its network namespaces, plus (after a crash that lost the
/// namespaces) processes whose command line marks them as its responders or agents.
pub fn lab_processes(names: &Names) -> Vec<u32> {
    let mut pids: Vec<u32> = net::list_netns()
        .iter()
        .filter(|ns| names.owns_netns(ns))
        .flat_map(|ns| net::pids_in_netns(ns))
        .collect();
    let me = std::process::id();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for pid in dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&p| p != me)
        {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
            let responder = args
                .windows(2)
                .any(|w| w[0] == b"--prefix" && w[1] == names.prefix.as_bytes())
                && args.iter().any(|a| *a == b"serve");
            let agent = args.iter().any(|a| {
                std::str::from_utf8(a)
                    .ok()
                    .and_then(|s| s.strip_prefix("/sys/fs/bpf/"))
                    .is_some_and(|pin| names.owns_pin(pin))
            });
            if responder || agent {
                pids.push(pid);
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids.retain(|&p| p != me);
    pids
}

fn teardown(names: &Names, paths: &Paths) -> Removed {
    let mut removed = Removed::default();
    let pids = lab_processes(names);
    removed.processes = pids.len();
    // Agents get a chance to exit cleanly; responders just go.
    net::terminate(&pids, libc::SIGTERM, Duration::from_secs(3));
    // Real nodes: containers outside the lab's namespaces, found by the nodes' cgroups.
    removed.processes += super::nodes::remove_cgroups(names);
    let mut namespaces: Vec<String> = net::list_netns()
        .into_iter()
        .filter(|ns| names.owns_netns(ns))
        .collect();
    // Pods first, then nodes, ext and the underlay.
    namespaces.sort_by_key(|ns| {
        if ns.contains("-pod-") {
            0
        } else if ns.contains("-node-") {
            1
        } else if ns.ends_with("-cp") {
            2
        } else {
            3
        }
    });
    for ns in &namespaces {
        match net::del_netns(ns) {
            Ok(()) => removed.netns += 1,
            Err(e) => eprintln!("warning: {e:#}"),
        }
    }
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        for e in dir.filter_map(|e| e.ok()) {
            if e.file_name().to_str().is_some_and(|n| names.owns_pin(n)) {
                match std::fs::remove_dir_all(e.path()) {
                    Ok(()) => removed.pins += 1,
                    Err(err) => eprintln!("warning: removing {}: {err}", e.path().display()),
                }
            }
        }
    }
    if paths.dir.exists() {
        removed.state = std::fs::remove_dir_all(&paths.dir).is_ok();
    }
    removed
}

// ---- objects as the agents see them -------------------------------------------------------------

pub fn namespace_file(name: &str) -> String {
    format!("namespace.{name}.yaml")
}
pub fn node_file(name: &str) -> String {
    format!("node.{name}.yaml")
}
pub fn namespaced_file(kind: &str, key: &str) -> String {
    format!("{kind}.{}.yaml", key.replace('/', "."))
}

/// Writes one object file atomically (the agent ignores names starting with '.').
pub fn write_object<T: Serialize>(dir: &Path, file: &str, obj: &T) -> Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, serde_yaml::to_string(obj)?)?;
    std::fs::rename(&tmp, dir.join(file)).with_context(|| format!("writing {file}"))?;
    Ok(())
}

pub fn remove_object(dir: &Path, file: &str) {
    let _ = std::fs::remove_file(dir.join(file));
}

fn node_object(node: &NodeState) -> Node {
    let pod_cidrs: Vec<String> = node
        .ips
        .iter()
        .map(|ip| topo::node_pods(node.number, Family::of(*ip)).to_string())
        .collect();
    let mut addresses: Vec<serde_json::Value> = node
        .ips
        .iter()
        .map(|ip| serde_json::json!({"type": "InternalIP", "address": ip.to_string()}))
        .collect();
    addresses.push(serde_json::json!({"type": "Hostname", "address": node.name}));
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux"}},
        "spec": {"podCIDR": pod_cidrs[0],
                 "podCIDRs": pod_cidrs},
        "status": {"addresses": addresses}
    }))
    .expect("a valid Node")
}

/// Drops what the API server adds for its own bookkeeping from an object's metadata.
pub fn strip_meta(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
        if a.is_empty() {
            meta.annotations = None;
        }
    }
}

/// Namespace as the API server stores it: `kubernetes.io/metadata.name` always set, phase Active.
pub fn normalize_namespace(mut ns: Namespace, uid: Option<String>) -> Namespace {
    let name = ns.metadata.name.clone().unwrap_or_default();
    ns.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("kubernetes.io/metadata.name".into(), name);
    ns.metadata.uid = Some(uid.unwrap_or_else(new_uid));
    ns.status = Some(k8s_openapi::api::core::v1::NamespaceStatus {
        phase: Some("Active".into()),
        ..Default::default()
    });
    ns
}

/// A random RFC 4122 version-4 UID, as the API server assigns.
pub fn new_uid() -> String {
    let mut b: [u8; 16] = net::random_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
