//! The lab's real-API mode (`lab up --api kube`): the cluster state lives in a real etcd and
//! kube-apiserver, EndpointSlices come from the real kube-controller-manager, the real kube-proxy
//! programs Service DNAT on every node, objects are applied with the real kubectl, and the agents
//! run the Kubernetes source under the RBAC of `deploy/base/`.
//!
//! ```text
//!   <p>-cp  eth0 172.18.0.254/24 on the node bridge (like kind's control-plane node):
//!           etcd on 127.0.0.1:2379, kube-apiserver on :6443, kube-controller-manager
//!   <p>-node-N  kube-proxy (iptables or nftables mode), policy-agent (--kubeconfig)
//! ```
//!
//! The lab plays the scheduler, the kubelet and the container runtime for its pods, as kwok does
//! for nodes: it binds unscheduled pods to its nodes, sets up each pod's network by invoking the
//! real CNI plugins with the CNI protocol (ptp + host-local, kindnet's chain), starts the
//! responders, and writes the pod's status through the API; a deleted pod is torn down (CNI DEL)
//! and then removed, as a kubelet confirms a graceful deletion. It does this at every lab command
//! that changes objects, and waits until the results are visible everywhere: EndpointSlices match
//! the pods, every kube-proxy has programmed them, and every agent reports the digest of exactly
//! the objects the API server holds (`/status` `enforced_objects`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    agent::{self, ObjectsDigest, workspace_root},
    cluster::{self, Lab, PodState, start_responders},
    net::{self, NetnsMode},
    objects::{Kind, ObjRef},
    services,
    topology::{self as topo, Family, IpFamily},
};

/// The control plane's address on the node network.
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 254);
/// Its IPv6 address, in IPv6-only and dual-stack labs.
pub const CONTROL_PLANE_IP6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfc00, 0xf853, 0xccd, 0xe793, 0, 0, 0, 0xfe);

/// The control plane's address of family `f`.
pub fn control_plane_addr(f: Family) -> std::net::IpAddr {
    match f {
        Family::V4 => CONTROL_PLANE_IP.into(),
        Family::V6 => CONTROL_PLANE_IP6.into(),
    }
}

/// The API server's URL in a lab of `families`: at the control plane's address of the primary
/// family (the family of the `kubernetes` Service), as every client on the nodes reaches it.
pub fn api_url(families: IpFamily) -> String {
    format!(
        "https://{}",
        SocketAddr::new(control_plane_addr(families.primary()), API_PORT)
    )
}

/// The ranges of `range` for every family of the lab, primary first, comma-separated (the
/// dual-stack form of kube-apiserver's and kube-controller-manager's range flags).
fn ranges(families: IpFamily, range: fn(Family) -> topo::Cidr) -> String {
    families
        .families()
        .iter()
        .map(|f| range(*f).to_string())
        .collect::<Vec<_>>()
        .join(",")
}
pub const API_PORT: u16 = 6443;
/// How long the lab waits for kube-network-policies, which reports no enforced state, after the
/// rest of the cluster has settled.
pub const PEER_SETTLE: Duration = Duration::from_millis(1000);
/// Where the real CNI plugins are (Debian's containernetworking-plugins).
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The agent's chained CNI plugin (its binary under this name).
pub const CNI_CHAINED: &str = "policy-agent-cni";

/// Plugin configurations (each with its own `cniVersion` and `name`, as the lab runs them one
/// by one) as one configuration list: the first one's version and name, the plugins without.
pub(super) fn conflist(mut plugins: Vec<Value>) -> Value {
    let mut version = Value::Null;
    let mut name = Value::Null;
    for (i, p) in plugins.iter_mut().enumerate() {
        let o = p.as_object_mut().expect("a CNI plugin configuration");
        let (v, n) = (o.remove("cniVersion"), o.remove("name"));
        if i == 0 {
            version = v.unwrap_or(Value::Null);
            name = n.unwrap_or(Value::Null);
        }
    }
    json!({"cniVersion": version, "name": name, "plugins": plugins})
}

/// Where the cluster state lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ApiMode {
    /// The manifest directory the agents read (standalone mode).
    #[default]
    Manifests,
    /// A real etcd, kube-apiserver, kube-controller-manager and kube-proxy.
    Kube,
}

/// What enforces NetworkPolicy on the nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Enforcer {
    #[default]
    PolicyAgent,
    /// The reference implementation kindnet embeds (real-API mode only).
    KubeNetworkPolicies,
}

/// The CNI chain the lab's kubelet invokes for a pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CniShape {
    /// kind's kindnet: `ptp` (a /32 per pod, host route `podIP/32 dev vethX`) with host-local.
    #[default]
    Ptp,
    /// k3s's flannel: `bridge` on `cni0` (the node is the pods' gateway) with host-local.
    Bridge,
}

/// The bridge of [`CniShape::Bridge`], as flannel names it.
pub const CNI_BRIDGE: &str = "cni0";

/// kube-proxy's mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    #[default]
    Iptables,
    Nftables,
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Nftables => "nftables",
        }
    }
}

/// What the lab remembers of its control plane.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KubeState {
    pub proxy_mode: ProxyMode,
    pub bin_dir: PathBuf,
    /// `gitVersion` of the API server's `/version`.
    pub server_version: String,
    /// etcd, kube-apiserver, kube-controller-manager, `kube-proxy-<node>` (and
    /// `kube-network-policies-<node>`), by name.
    pub components: BTreeMap<String, Component>,
    /// kube-network-policies enforces instead of policy-agent.
    #[serde(default)]
    pub peer_enforcer: bool,
    /// Real kubelets and containerd run the pods ([`super::nodes`]), not the lab.
    #[serde(default)]
    pub kubelet: bool,
    #[serde(default)]
    pub cni: CniShape,
}

/// One running control-plane process, with what it takes to start it again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Component {
    pub netns: String,
    pub argv: Vec<String>,
    pub pid: Option<u32>,
    /// Enters the node's view of `/sys` (kube-proxy), or only the network namespace.
    pub sysfs: bool,
    #[serde(default)]
    pub env: Vec<(String, String)>,
}

/// Files of the control plane, under the lab's state directory.
pub(super) struct Files {
    dir: PathBuf,
}

impl Files {
    pub(super) fn of(lab: &Lab) -> Files {
        Files {
            dir: lab.paths.dir.join("kube"),
        }
    }
    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    /// The bearer token of a node's kubelet (user `system:node:<node>` in `system:nodes`, as the
    /// Node authorizer expects).
    pub(super) fn node_token(&self, node: &str) -> Result<String> {
        let p = self.path(&format!("node-{node}.token"));
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    }
    /// kubectl and the control-plane components reach the API server on the control plane's
    /// loopback; the nodes through the node network.
    fn admin_kubeconfig(&self) -> PathBuf {
        self.path("admin.kubeconfig")
    }
    fn node_admin_kubeconfig(&self) -> PathBuf {
        self.path("node-admin.kubeconfig")
    }
    pub fn agent_kubeconfig(&self) -> PathBuf {
        self.path("agent.kubeconfig")
    }
    fn cni_state(&self, node: &str) -> PathBuf {
        self.path("cni").join(node)
    }
}

pub fn agent_kubeconfig(lab: &Lab) -> PathBuf {
    Files::of(lab).agent_kubeconfig()
}

pub(super) fn kubeconfig_text(server: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: lab\n  user:\n    token: {token}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: lab\ncurrent-context: lab\n",
        ca.display()
    )
}

/// openssl req arguments for a new unencrypted P-256 key.
const NEW_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    net::run(Command::new("openssl").current_dir(dir).args(args))
        .context("generating the lab's certificates with openssl")
}

/// A CA, the API server's serving certificate, its client certificate for kubelets, the
/// service-account signing key, an admin token and a token per node, new for every lab.
fn make_credentials(files: &Files, nodes: &[String], families: IpFamily) -> Result<String> {
    let d = &files.dir;
    std::fs::create_dir_all(d)?;
    let mut ca = vec!["req", "-x509"];
    ca.extend(NEW_KEY);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=lab-ca",
    ]);
    openssl(d, &ca)?;
    // Every address the API server is reached at: the control plane's and the first address of
    // each service range (the `kubernetes` Service), of both families.
    let ips: String = [Family::V4, Family::V6]
        .iter()
        .flat_map(|f| [control_plane_addr(*f), topo::service_cidr(*f).nth(1)])
        .map(|ip| format!("IP:{ip},"))
        .collect();
    signed_cert(
        d,
        "apiserver",
        "/CN=kube-apiserver",
        &format!(
            "subjectAltName={ips}IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n"
        ),
    )?;
    // The API server's identity towards kubelets (exec, logs, port-forward); the kubelets
    // authorize it through the API server (Webhook mode), as system:masters.
    signed_cert(
        d,
        "kubelet-client",
        "/O=system:masters/CN=kube-apiserver-kubelet-client",
        "extendedKeyUsage=clientAuth\n",
    )?;
    openssl(
        d,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "sa.key",
        ],
    )?;
    openssl(d, &["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    let new_token = || -> String {
        net::random_bytes::<16>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let token = new_token();
    let mut tokens = format!("{token},lab-admin,lab-admin,system:masters\n");
    for node in nodes {
        let t = new_token();
        tokens.push_str(&format!(
            "{t},system:node:{node},system:node:{node},system:nodes\n"
        ));
        std::fs::write(files.path(&format!("node-{node}.token")), &t)?;
    }
    std::fs::write(d.join("tokens.csv"), tokens)?;
    let ca = d.join("ca.crt");
    std::fs::write(
        files.admin_kubeconfig(),
        kubeconfig_text(&format!("https://127.0.0.1:{API_PORT}"), &ca, &token),
    )?;
    std::fs::write(
        files.node_admin_kubeconfig(),
        kubeconfig_text(&api_url(families), &ca, &token),
    )?;
    Ok(token)
}

/// `<name>.key` and `<name>.crt`, a P-256 key and a certificate for `subject` signed by the
/// lab's CA, with the X.509 extensions `ext` (openssl extfile syntax).
fn signed_cert(d: &Path, name: &str, subject: &str, ext: &str) -> Result<()> {
    let (key, csr, crt, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("{name}.ext"),
    );
    let mut req = vec!["req", "-new"];
    req.extend(NEW_KEY);
    req.extend(["-keyout", &key, "-out", &csr, "-subj", subject]);
    openssl(d, &req)?;
    std::fs::write(d.join(&extfile), ext)?;
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            &extfile,
            "-out",
            &crt,
        ],
    )
}

fn wait_tcp(
    netns: &str,
    addr: SocketAddrV4,
    timeout: Duration,
    what: &str,
    log: &Path,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let up = net::in_netns(netns, || {
            TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_millis(200)).is_ok()
        })?;
        if up {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{what} did not listen on {addr} within {timeout:?}; {}",
                agent::log_tail(log, 15)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

impl Lab {
    pub fn is_kube(&self) -> bool {
        self.state.kube.is_some()
    }

    pub(super) fn kube(&self) -> &KubeState {
        self.state
            .kube
            .as_ref()
            .expect("a lab in the real-API mode")
    }

    /// Runs the real kubectl (inside the control-plane namespace, as the lab's admin); fails with
    /// kubectl's own message.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let files = Files::of(self);
        let mut cmd = Command::new(Path::new(&self.kube().bin_dir).join("kubectl"));
        cmd.arg("--kubeconfig")
            .arg(files.admin_kubeconfig())
            .arg("--cache-dir")
            .arg(files.path("kubectl-cache"))
            .args(args);
        net::set_netns(&mut cmd, &self.names.control_plane_ns(), NetnsMode::Net)?;
        let t = Instant::now();
        let out = net::output_of(&mut cmd, stdin)?;
        self.trace(
            &format!(
                "kubectl {}",
                args.iter().take(3).copied().collect::<Vec<_>>().join(" ")
            ),
            t,
        );
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            bail!(
                "{}",
                if err.is_empty() {
                    format!("kubectl {} failed", args.join(" "))
                } else {
                    err
                }
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The API server's `gitVersion`.
    pub fn server_version(&self) -> &str {
        &self.kube().server_version
    }

    /// `program` in the control-plane namespace with `KUBECONFIG` naming the admin kubeconfig,
    /// as a client of the cluster (the e2e suite) runs.
    pub fn control_plane_command(&self, program: &Path) -> Result<Command> {
        let mut cmd = Command::new(program);
        cmd.env("KUBECONFIG", Files::of(self).admin_kubeconfig());
        net::set_netns(&mut cmd, &self.names.control_plane_ns(), NetnsMode::Net)?;
        Ok(cmd)
    }

    fn trace(&self, what: &str, since: Instant) {
        if std::env::var_os("LAB_TRACE").is_some() {
            eprintln!("[lab] {what}: {} ms", since.elapsed().as_millis());
        }
    }

    pub(super) fn kubectl_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.kubectl(&all, None)?;
        serde_json::from_str(&text).with_context(|| format!("parsing kubectl {}", args.join(" ")))
    }

    /// Starts the control plane, registers the nodes, installs the agent's RBAC and starts
    /// kube-proxy on every node. Called by `up` after the node namespaces exist.
    /// With `kubelet` (the agent binary for the image), real kubelets and containerd run the
    /// nodes and kube-scheduler binds pods ([`super::nodes`]).
    pub(crate) fn kube_up(
        &mut self,
        proxy_mode: ProxyMode,
        peer: bool,
        cni: CniShape,
        kubelet: Option<&Path>,
    ) -> Result<()> {
        if peer {
            nft_queue_supported(&self.state.nodes[0].netns)?;
        }
        if cni == CniShape::Bridge {
            // The bridge plugin makes the node the gateway of its pod range on cni0: that
            // connected route replaces the "unreachable" one, and bridged pod traffic passes
            // iptables, as kube-proxy requires (br_netfilter, per namespace).
            for node in &self.state.nodes {
                let routes: Vec<String> = self
                    .state
                    .ip_family
                    .families()
                    .iter()
                    .map(|f| format!("route del unreachable {}", topo::node_pods(node.number, *f)))
                    .collect();
                net::ip_batch(&node.netns, &routes)?;
                for key in ["iptables", "ip6tables"] {
                    net::sysctl(
                        &node.netns,
                        &format!("net/bridge/bridge-nf-call-{key}"),
                        "1",
                    )
                    .context("bridged pod traffic must pass iptables (br_netfilter)")?;
                }
            }
        }
        let bins = crate::kube::Binaries::find()?;
        let files = Files::of(self);
        let names = self.names.clone();
        let cp = names.control_plane_ns();
        // The control-plane "node" on the node bridge.
        net::add_netns(&cp)?;
        let families = self.state.ip_family;
        cluster::set_families(&cp, families, false)?;
        net::ip_batch(
            &names.underlay_ns(),
            &[
                format!(
                    "link add {} type veth peer name eth0 netns {cp}",
                    names.control_plane_link()
                ),
                format!(
                    "link set {} master {}",
                    names.control_plane_link(),
                    names.bridge()
                ),
                format!("link set {} up", names.control_plane_link()),
            ],
        )?;
        let mut cp_cmds = vec!["link set lo up".to_string()];
        for &f in families.families() {
            cp_cmds.push(format!(
                "addr add {}/{} dev eth0{}",
                control_plane_addr(f),
                topo::node_cidr(f).len,
                cluster::nodad(f)
            ));
        }
        cp_cmds.push("link set eth0 up".into());
        for &f in families.families() {
            cp_cmds.push(format!("route add default via {}", topo::node_gateway(f)));
        }
        net::ip_batch(&cp, &cp_cmds)?;
        let node_names: Vec<String> = self.state.nodes.iter().map(|n| n.name.clone()).collect();
        make_credentials(&files, &node_names, families)?;
        self.state.kube = Some(KubeState {
            proxy_mode,
            bin_dir: bins.dir.clone(),
            server_version: String::new(),
            components: BTreeMap::new(),
            peer_enforcer: peer,
            cni,
            kubelet: kubelet.is_some(),
        });
        let d = &files.dir;
        // etcd
        let mut etcd = Command::new(bins.path("etcd"));
        etcd.args([
            "--name=lab",
            "--listen-client-urls=http://127.0.0.1:2379",
            "--advertise-client-urls=http://127.0.0.1:2379",
            "--listen-peer-urls=http://127.0.0.1:2380",
            "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=lab=http://127.0.0.1:2380",
            "--listen-metrics-urls=http://127.0.0.1:2381",
            // A lab cluster: losing the last writes on a host crash is fine.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ])
        .arg(format!("--data-dir={}", d.join("etcd").display()));
        self.add_component("etcd", &cp, etcd, false)?;
        wait_tcp(
            &cp,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2379),
            Duration::from_secs(30),
            "etcd",
            &self.component_log("etcd"),
        )?;
        // kube-apiserver
        let p = |f: &str| d.join(f).display().to_string();
        let mut api = Command::new(bins.path("kube-apiserver"));
        api.args([
            "--etcd-servers=http://127.0.0.1:2379".to_string(),
            format!(
                "--advertise-address={}",
                control_plane_addr(families.primary())
            ),
            format!("--secure-port={API_PORT}"),
            format!(
                "--service-cluster-ip-range={}",
                ranges(families, topo::service_cidr)
            ),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=Node,RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--allow-privileged=true".into(),
            // Kubelets are reached at their node address, as kind's API server does.
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!("--kubelet-client-certificate={}", p("kubelet-client.crt")),
            format!("--kubelet-client-key={}", p("kubelet-client.key")),
            "--profiling=false".into(),
            format!("--cert-dir={}", p("apiserver-certs")),
            "--v=1".into(),
        ]);
        self.add_component("kube-apiserver", &cp, api, false)?;
        self.wait_api_ready(
            Duration::from_secs(90),
            &self.component_log("kube-apiserver"),
        )?;
        let version = self.kubectl_json(&["get", "--raw=/version"]);
        // `get --raw` with `-o json` is not accepted by every kubectl; fall back to the plain call.
        let version = match version {
            Ok(v) => v,
            Err(_) => serde_json::from_str(&self.kubectl(&["get", "--raw=/version"], None)?)?,
        };
        self.kube_mut().server_version = version["gitVersion"]
            .as_str()
            .unwrap_or("unknown")
            .to_string();
        // kube-controller-manager: EndpointSlices, namespaces, service accounts, garbage collection.
        // Without kubelets there are no node heartbeats: the node lifecycle controller would taint
        // every node unreachable and evict the pods, so it is off unless real kubelets run.
        let mut kcm = Command::new(bins.path("kube-controller-manager"));
        kcm.args([
            format!("--kubeconfig={}", files.admin_kubeconfig().display()),
            if kubelet.is_some() {
                "--controllers=*".into()
            } else {
                "--controllers=*,-node-lifecycle-controller".into()
            },
            "--leader-elect=false".into(),
            "--use-service-account-credentials=false".into(),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            format!("--cluster-cidr={}", ranges(families, topo::pod_cidr)),
            format!(
                "--service-cluster-ip-range={}",
                ranges(families, topo::service_cidr)
            ),
            "--bind-address=127.0.0.1".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ]);
        self.add_component("kube-controller-manager", &cp, kcm, false)?;
        let node_bins = kubelet.map(|_| crate::kube::ensure_node()).transpose()?;
        if let Some(node_bins) = &node_bins {
            let mut sched = Command::new(node_bins.path("kube-scheduler"));
            sched.args([
                format!("--kubeconfig={}", files.admin_kubeconfig().display()),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--profiling=false".into(),
                "--v=1".into(),
            ]);
            self.add_component("kube-scheduler", &cp, sched, false)?;
        }
        self.register_nodes()?;
        // The agent's identity and permissions, exactly as the DaemonSet installs them
        // (`LAB_AGENT_RBAC` names another file instead of deploy/base/rbac.yaml, for tests of
        // an agent that lacks a permission).
        let base = workspace_root().join("deploy").join("base");
        let rbac = std::env::var_os("LAB_AGENT_RBAC")
            .map(PathBuf::from)
            .unwrap_or_else(|| base.join("rbac.yaml"));
        for f in [base.join("namespace.yaml"), rbac] {
            self.kubectl(&["apply", "-f", &f.display().to_string()], None)
                .with_context(|| format!("applying {}", f.display()))?;
        }
        let token = self
            .kubectl(
                &[
                    "create",
                    "token",
                    "policy-agent",
                    "--namespace",
                    "policy-agent",
                    "--duration=8760h",
                ],
                None,
            )
            .context("creating a token for the policy-agent ServiceAccount")?;
        std::fs::write(
            files.agent_kubeconfig(),
            kubeconfig_text(&api_url(families), &d.join("ca.crt"), token.trim()),
        )?;
        for i in 0..self.state.nodes.len() {
            self.start_kube_proxy(i, proxy_mode, &bins)?;
        }
        if peer {
            let peer_bins = crate::kube::PEER.ensure()?;
            // As a kubelet projects a ServiceAccount token into a pod: the token and the CA at
            // the in-cluster path, in a private mount namespace of the process, and the API
            // server's address in the environment.
            let sa = files.path("serviceaccount");
            std::fs::create_dir_all(&sa)?;
            std::fs::write(sa.join("token"), token.trim())?;
            std::fs::copy(d.join("ca.crt"), sa.join("ca.crt"))?;
            std::fs::write(sa.join("namespace"), "policy-agent")?;
            for i in 0..self.state.nodes.len() {
                let node = self.state.nodes[i].clone();
                let mut cmd = Command::new("/bin/sh");
                cmd.arg("-c")
                    .arg(concat!(
                        "mount -t tmpfs lab-run /run && ",
                        "mkdir -p /run/secrets/kubernetes.io/serviceaccount && ",
                        "mount --bind \"$0\" /run/secrets/kubernetes.io/serviceaccount && ",
                        "exec \"$@\""
                    ))
                    .arg(&sa)
                    .arg(peer_bins.path(super::knp::BINARY))
                    .args(super::knp::args(&node.name))
                    .env(
                        "KUBERNETES_SERVICE_HOST",
                        control_plane_addr(families.primary()).to_string(),
                    )
                    .env("KUBERNETES_SERVICE_PORT", API_PORT.to_string());
                self.add_component(
                    &format!("kube-network-policies-{}", node.name),
                    &node.netns,
                    cmd,
                    true,
                )?;
            }
        }
        if let (Some(agent_bin), Some(node_bins)) = (kubelet, &node_bins) {
            self.start_nodes(agent_bin, node_bins)?;
        } else {
            self.write_cni_chain()?;
        }
        self.wait_service_account("default")?;
        Ok(())
    }

    fn kube_mut(&mut self) -> &mut KubeState {
        self.state
            .kube
            .as_mut()
            .expect("a lab in the real-API mode")
    }

    fn wait_api_ready(&self, timeout: Duration, log: &Path) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            for (name, c) in &self.kube().components {
                if c.pid.is_some_and(|pid| !net::process_alive(pid)) {
                    bail!(
                        "{name} exited; {}",
                        agent::log_tail(&self.component_log(name), 20)
                    );
                }
            }
            match self.kubectl(&["get", "--raw=/readyz"], None) {
                Ok(t) if t.trim() == "ok" => return Ok(()),
                Ok(t) => last = t,
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                bail!(
                    "kube-apiserver was not ready within {timeout:?}: {last}; {}",
                    agent::log_tail(log, 20)
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// Node objects with addresses, pod CIDR, capacity and a Ready condition, as kubelets
    /// register them.
    fn register_nodes(&self) -> Result<()> {
        for node in &self.state.nodes {
            let cidrs: Vec<String> = node
                .ips
                .iter()
                .map(|ip| topo::node_pods(node.number, Family::of(*ip)).to_string())
                .collect();
            let obj = json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node.name, "labels": {
                    "kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64"}},
                "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs},
            });
            self.kubectl(&["apply", "-f", "-"], Some(&obj.to_string()))
                .with_context(|| format!("registering Node {}", node.name))?;
            if self.kube().kubelet {
                // The node's kubelet reports its status.
                continue;
            }
            let now = now_rfc3339();
            let mut addresses: Vec<Value> = node
                .ips
                .iter()
                .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
                .collect();
            addresses.push(json!({"type": "Hostname", "address": node.name}));
            let status = json!({"status": {
                "addresses": addresses,
                "capacity": {"cpu": "8", "memory": "16Gi", "pods": "250"},
                "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "250"},
                "conditions": [{"type": "Ready", "status": "True", "reason": "LabKubelet",
                                "message": "the lab runs this node's pods",
                                "lastHeartbeatTime": now, "lastTransitionTime": now}],
                "nodeInfo": {"kubeletVersion": crate::kube::KUBERNETES_VERSION,
                             "kubeProxyVersion": crate::kube::KUBERNETES_VERSION,
                             "operatingSystem": "linux", "architecture": "amd64",
                             "containerRuntimeVersion": "lab://1", "kernelVersion": "", "osImage": "lab",
                             "machineID": "", "systemUUID": "", "bootID": ""}}});
            self.kubectl(
                &[
                    "patch",
                    "node",
                    &node.name,
                    "--subresource=status",
                    "--type=merge",
                    "-p",
                    &status.to_string(),
                ],
                None,
            )
            .with_context(|| format!("writing the status of Node {}", node.name))?;
        }
        Ok(())
    }

    fn start_kube_proxy(
        &mut self,
        i: usize,
        mode: ProxyMode,
        bins: &crate::kube::Binaries,
    ) -> Result<()> {
        let files = Files::of(self);
        let node = &self.state.nodes[i];
        // Zero conntrack settings leave the host's global conntrack table alone; kube-proxy
        // listens on the node namespace's loopback only.
        let config = json!({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": files.node_admin_kubeconfig()},
            "hostnameOverride": node.name,
            "mode": mode.as_str(),
            "clusterCIDR": ranges(self.state.ip_family, topo::pod_cidr),
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"minSyncPeriod": "0s", "syncPeriod": "30s"},
            "nftables": {"minSyncPeriod": "0s", "syncPeriod": "30s"},
        });
        let path = files.path(&format!("kube-proxy-{}.yaml", node.name));
        std::fs::write(&path, serde_json::to_string_pretty(&config)?)?;
        let mut cmd = Command::new(bins.path("kube-proxy"));
        cmd.arg(format!("--config={}", path.display()));
        let (name, netns) = (format!("kube-proxy-{}", node.name), node.netns.clone());
        self.add_component(&name, &netns, cmd, true)
    }

    pub(super) fn component_log(&self, name: &str) -> PathBuf {
        self.paths.logs().join(format!("{name}.log"))
    }

    /// Starts a component and remembers how, so that it can be stopped and started again.
    pub(super) fn add_component(
        &mut self,
        name: &str,
        netns: &str,
        cmd: Command,
        sysfs: bool,
    ) -> Result<()> {
        let argv: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let env = cmd
            .get_envs()
            .filter_map(|(k, v)| {
                Some((
                    k.to_string_lossy().into_owned(),
                    v?.to_string_lossy().into_owned(),
                ))
            })
            .collect();
        let c = Component {
            netns: netns.to_string(),
            argv,
            pid: None,
            sysfs,
            env,
        };
        self.kube_mut().components.insert(name.to_string(), c);
        self.start_component(name)
    }

    fn start_component(&mut self, name: &str) -> Result<()> {
        let log = self.component_log(name);
        let c = self
            .kube()
            .components
            .get(name)
            .ok_or_else(|| anyhow!("no component {name:?}"))?
            .clone();
        if c.pid.is_some_and(net::process_alive) {
            bail!(
                "{name} is already running (pid {})",
                c.pid.unwrap_or_default()
            );
        }
        let mut cmd = Command::new(&c.argv[0]);
        cmd.args(&c.argv[1..])
            .envs(c.env.iter().map(|(k, v)| (k, v)));
        let mode = if c.sysfs {
            NetnsMode::DaemonWithSysfs
        } else {
            NetnsMode::Daemon
        };
        let pid = net::spawn_daemon(cmd, &c.netns, mode, &log)?.id();
        self.kube_mut()
            .components
            .get_mut(name)
            .expect("exists")
            .pid = Some(pid);
        self.save()
    }

    /// `lab control-plane stop|start NAME`: stops (SIGTERM, then SIGKILL) or starts one
    /// component, for tests of what the agents do while it is away. Starting the API server
    /// waits until it is ready.
    pub fn control_plane(&mut self, start: bool, name: &str) -> Result<String> {
        if !self.is_kube() {
            bail!("this lab has no control plane (it was brought up with --api manifests)");
        }
        let Some(c) = self.kube().components.get(name).cloned() else {
            let known: Vec<&String> = self.kube().components.keys().collect();
            bail!("no component {name:?}; the lab runs {known:?}");
        };
        if start {
            self.start_component(name)?;
            if name == "kube-apiserver" {
                self.wait_api_ready(Duration::from_secs(90), &self.component_log(name))?;
            }
            if name == "etcd" {
                wait_tcp(
                    &c.netns,
                    SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2379),
                    Duration::from_secs(30),
                    "etcd",
                    &self.component_log(name),
                )?;
            }
            Ok(format!(
                "{name} started (pid {})",
                self.kube().components[name].pid.unwrap_or_default()
            ))
        } else {
            let pids: Vec<u32> = c
                .pid
                .into_iter()
                .filter(|&p| net::process_alive(p))
                .collect();
            net::terminate(&pids, libc::SIGTERM, Duration::from_secs(5));
            self.kube_mut()
                .components
                .get_mut(name)
                .expect("exists")
                .pid = None;
            self.save()?;
            Ok(format!("{name} stopped"))
        }
    }

    /// Compacts etcd's history up to its current revision (what the API server does every five
    /// minutes), so that watches resuming from an older resourceVersion get 410 Gone.
    pub fn compact_etcd(&self) -> Result<u64> {
        let cp = self.names.control_plane_ns();
        let post = |path: &str, body: &str| -> Result<Value> {
            let etcd = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2379);
            let (code, text) = net::in_netns(&cp, || {
                agent::http_request(
                    "POST",
                    etcd.into(),
                    path,
                    Some(body),
                    Duration::from_secs(10),
                )
            })??;
            if code != 200 {
                bail!("etcd {path} answered {code}: {text}");
            }
            serde_json::from_str(&text).with_context(|| format!("etcd {path}: {text}"))
        };
        // The revision is in every response header; a range over an empty key reads it.
        let head = post("/v3/kv/range", r#"{"key":"AA=="}"#)?;
        let rev: u64 = head["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| anyhow!("etcd returned no revision: {head}"))?;
        post(
            "/v3/kv/compaction",
            &format!(r#"{{"revision":"{rev}","physical":true}}"#),
        )?;
        Ok(rev)
    }

    /// Waits for the ServiceAccount controller to create `default` in a namespace (pods are
    /// admitted only then).
    fn wait_service_account(&self, namespace: &str) -> Result<()> {
        let deadline = Instant::now() + self.converge_timeout;
        loop {
            let out = self.kubectl(
                &[
                    "get",
                    "serviceaccount",
                    "default",
                    "--namespace",
                    namespace,
                    "--ignore-not-found",
                    "-o",
                    "name",
                ],
                None,
            )?;
            if !out.trim().is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the ServiceAccount controller did not create {namespace}/default within {:?}",
                    self.converge_timeout
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    // ---- apply and delete through kubectl ---------------------------------------------------

    /// `kubectl apply` of these documents: namespaces first (and the ones pods or policies refer
    /// to), then everything else; then the lab's kubelet work and convergence. The API server
    /// validates everything first (`--dry-run=server`), so an invalid document changes nothing.
    pub fn kube_apply(&mut self, docs: &[(String, Value)]) -> Result<super::apply::Report> {
        use super::apply::{Change, Report};
        if docs.is_empty() {
            bail!("no objects found");
        }
        // A dual-stack lab's Services are dual-stack unless they say otherwise, as in the
        // manifest mode (the API server's own default is SingleStack).
        let dual = self.state.ip_family.families().len() > 1;
        let docs: Vec<(String, Value)> = docs
            .iter()
            .map(|(source, v)| {
                let mut v = v.clone();
                if dual
                    && v["kind"] == "Service"
                    && v["spec"].is_object()
                    && v["spec"].get("ipFamilyPolicy").is_none()
                {
                    v["spec"]["ipFamilyPolicy"] = json!("PreferDualStack");
                }
                (source.clone(), v)
            })
            .collect();
        let docs = &docs[..];
        let refs: Vec<ObjRef> = docs
            .iter()
            .map(|(source, v)| {
                super::objects::doc_ref(&super::objects::Doc {
                    source: source.clone(),
                    value: v.clone(),
                })
            })
            .collect::<Result<_>>()?;
        // Namespaces the documents need, created as the manifest mode does.
        let existing: BTreeSet<String> = self.list_names("namespaces")?;
        let mut needed: BTreeSet<String> = refs
            .iter()
            .filter(|r| r.kind.namespaced())
            .map(|r| r.namespace.clone())
            .collect();
        needed.retain(|n| !existing.contains(n));
        let declared: BTreeSet<String> = refs
            .iter()
            .filter(|r| r.kind == Kind::Namespace)
            .map(|r| r.name.clone())
            .collect();
        let list = |items: Vec<Value>| {
            json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
        };
        type Docs<'a> = Vec<&'a (String, Value)>;
        let (ns_docs, rest): (Docs, Docs) =
            docs.iter().partition(|(_, v)| v["kind"] == "Namespace");
        let mut first: Vec<Value> = ns_docs.iter().map(|(_, v)| v.clone()).collect();
        for n in needed.iter().filter(|n| !declared.contains(*n)) {
            first.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}));
        }
        let all: Vec<Value> = first
            .iter()
            .cloned()
            .chain(rest.iter().map(|(_, v)| v.clone()))
            .collect();
        // Validation of everything by the API server (namespaces that do not exist yet make
        // namespaced objects fail a server dry run, so those are checked against the schema only).
        let (dry_ns, dry_rest): (Vec<Value>, Vec<Value>) = all.iter().cloned().partition(|v| {
            v["kind"] == "Namespace"
                || !needed.contains(v["metadata"]["namespace"].as_str().unwrap_or("default"))
        });
        self.kubectl(
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&list(dry_ns)),
        )
        .map_err(|e| anyhow!("nothing was applied:\n{e}"))?;
        if !dry_rest.is_empty() {
            self.kubectl(
                &["apply", "--dry-run=client", "--validate=strict", "-f", "-"],
                Some(&list(dry_rest)),
            )
            .map_err(|e| anyhow!("nothing was applied:\n{e}"))?;
        }
        let mut out = String::new();
        if !first.is_empty() {
            out += &self.kubectl(&["apply", "-f", "-"], Some(&list(first.clone())))?;
        }
        let pod_namespaces: BTreeSet<String> = refs
            .iter()
            .filter(|r| r.kind == Kind::Pod)
            .map(|r| r.namespace.clone())
            .collect();
        for ns in &pod_namespaces {
            self.wait_service_account(ns)?;
        }
        if !rest.is_empty() {
            let items = rest.iter().map(|(_, v)| v.clone()).collect();
            out += &self.kubectl(&["apply", "-f", "-"], Some(&list(items)))?;
        }
        // kubectl prints one line per object, in input order: `kind/name created|configured|unchanged`.
        let mut order: Vec<ObjRef> = needed
            .iter()
            .filter(|n| !declared.contains(*n))
            .map(|n| ObjRef {
                kind: Kind::Namespace,
                namespace: String::new(),
                name: n.clone(),
            })
            .collect();
        let ns_refs: Vec<ObjRef> = refs
            .iter()
            .filter(|r| r.kind == Kind::Namespace)
            .cloned()
            .collect();
        let other: Vec<ObjRef> = refs
            .iter()
            .filter(|r| r.kind != Kind::Namespace)
            .cloned()
            .collect();
        let mut in_order: Vec<ObjRef> = ns_refs;
        in_order.append(&mut order);
        in_order.extend(other);
        let mut changes = Vec::new();
        let mut any = false;
        for (r, line) in in_order.iter().zip(out.lines()) {
            let c = match line.rsplit(' ').next().unwrap_or("") {
                "created" => Change::Created,
                "configured" => Change::Configured,
                _ => Change::Unchanged,
            };
            any |= c != Change::Unchanged;
            let note = if needed.contains(&r.name)
                && r.kind == Kind::Namespace
                && !declared.contains(&r.name)
            {
                "referenced".to_string()
            } else {
                String::new()
            };
            changes.push((r.clone(), c, note));
        }
        if !any {
            self.kube_refresh()?;
            return Ok(Report {
                changes,
                converged: None,
            });
        }
        let converged = self.kube_converge()?;
        for (r, _, note) in changes.iter_mut() {
            if r.kind == Kind::Pod
                && let Some(p) = self.state.pods.get(&r.key())
                && note.is_empty()
            {
                *note = format!("{}, {}", topo::node_name(p.node), p.ip());
            }
        }
        Ok(Report {
            changes,
            converged: Some(converged),
        })
    }

    /// `kubectl delete` of these objects; returns when they are gone and the rest is enforced.
    pub fn kube_delete(
        &mut self,
        refs: Vec<ObjRef>,
        ignore_not_found: bool,
    ) -> Result<super::apply::Report> {
        use super::apply::{Change, Report};
        let mut changes = Vec::new();
        let mut errors = Vec::new();
        let mut present = Vec::new();
        for r in refs {
            if present.contains(&r) {
                continue;
            }
            if !self.exists(&r)? {
                if !ignore_not_found {
                    errors.push(format!("{r}: not found"));
                }
            } else {
                present.push(r);
            }
        }
        if !errors.is_empty() {
            bail!("nothing was deleted:\n  {}", errors.join("\n  "));
        }
        if present.is_empty() {
            return Ok(Report {
                changes,
                converged: None,
            });
        }
        // A namespace's pods first, so that the namespace controller finds them gone instead of
        // waiting out its back-off while the kubelet tears them down.
        for r in present.iter().filter(|r| r.kind == Kind::Namespace) {
            self.kubectl(
                &[
                    "delete",
                    "pods",
                    "--all",
                    "--namespace",
                    &r.name,
                    "--wait=false",
                ],
                None,
            )?;
        }
        if present.iter().any(|r| r.kind == Kind::Namespace) {
            self.kubelet_sync()?;
        }
        for r in &present {
            let mut args = vec![
                "delete",
                resource(r.kind),
                r.name.as_str(),
                "--wait=false",
                "--ignore-not-found",
            ];
            if r.kind.namespaced() {
                args.extend(["--namespace", r.namespace.as_str()]);
            }
            self.kubectl(&args, None)?;
            changes.push((r.clone(), Change::Deleted, String::new()));
        }
        // Terminating pods wait for their kubelet: tear them down until everything is gone.
        let deadline = Instant::now() + self.converge_timeout;
        loop {
            self.kubelet_sync()?;
            let mut left = Vec::new();
            for r in &present {
                if self.exists(r)? {
                    left.push(r.to_string());
                }
            }
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "still not deleted after {:?}: {}",
                    self.converge_timeout,
                    left.join(", ")
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        let converged = self.kube_converge()?;
        Ok(Report {
            changes,
            converged: Some(converged),
        })
    }

    /// Whether the API server has this object.
    fn exists(&self, r: &ObjRef) -> Result<bool> {
        let mut args = vec![
            "get",
            resource(r.kind),
            r.name.as_str(),
            "--ignore-not-found",
            "-o",
            "name",
        ];
        if r.kind.namespaced() {
            args.extend(["--namespace", r.namespace.as_str()]);
        }
        Ok(!self.kubectl(&args, None)?.trim().is_empty())
    }

    fn list_names(&self, resource: &str) -> Result<BTreeSet<String>> {
        let v = self.kubectl_json(&["get", resource])?;
        Ok(v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["metadata"]["name"].as_str().map(String::from))
            .collect())
    }

    // ---- the kubelet's and the scheduler's share ------------------------------------------

    /// One pass over the pods: binds unscheduled ones to a lab node, sets up new ones on lab
    /// nodes (CNI ADD, responders, status), tears down deleted or terminating ones (CNI DEL) and
    /// confirms their deletion. Returns whether anything changed.
    pub(crate) fn kubelet_sync(&mut self) -> Result<bool> {
        if self.kube().kubelet {
            return Ok(false);
        }
        let mut pods = self.list_pods()?;
        let mut changed = false;
        // Scheduler: least-loaded node first, as the manifest mode spreads pods.
        let unbound: Vec<Pod> = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none())
            .cloned()
            .collect();
        if !unbound.is_empty() {
            let mut load: BTreeMap<u32, usize> =
                self.state.nodes.iter().map(|n| (n.number, 0)).collect();
            for p in &pods {
                if let Some(n) = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .and_then(topo::node_number)
                {
                    *load.entry(n).or_default() += 1;
                }
            }
            for p in &unbound {
                let (&node, _) = load.iter().min_by_key(|(n, l)| (**l, **n)).expect("nodes");
                *load.get_mut(&node).expect("exists") += 1;
                let binding = json!({
                    "apiVersion": "v1", "kind": "Binding",
                    "metadata": {"name": p.metadata.name, "namespace": p.metadata.namespace},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": topo::node_name(node)},
                });
                self.kubectl(&["create", "-f", "-"], Some(&binding.to_string()))
                    .with_context(|| format!("binding pod {}", pod_key(p)))?;
            }
            pods = self.list_pods()?;
            changed = true;
        }
        let live: BTreeMap<String, &Pod> = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| (pod_key(p), p))
            .collect();
        // Tear down what is gone, terminating, or was replaced by a pod of the same name.
        let gone: Vec<PodState> = self
            .state
            .pods
            .iter()
            .filter(|(k, s)| {
                live.get(*k)
                    .is_none_or(|p| p.metadata.uid != s.pod.metadata.uid)
            })
            .map(|(_, s)| s.clone())
            .collect();
        if !gone.is_empty() {
            for p in &gone {
                self.cni_del(p);
            }
            self.remove_pod_networks(&gone);
            for p in &gone {
                self.state.pods.remove(&pod_key(&p.pod));
            }
            changed = true;
        }
        // Confirm the deletion of terminating pods (their network is gone now).
        for p in pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_some())
        {
            let key = pod_key(p);
            let ns = p.metadata.namespace.clone().unwrap_or_default();
            let name = p.metadata.name.clone().unwrap_or_default();
            self.kubectl(
                &[
                    "delete",
                    "pod",
                    &name,
                    "--namespace",
                    &ns,
                    "--grace-period=0",
                    "--force",
                    "--ignore-not-found",
                    "--wait=false",
                ],
                None,
            )
            .with_context(|| format!("confirming the deletion of pod {key}"))?;
            changed = true;
        }
        // Set up new pods on lab nodes.
        let new: Vec<Pod> = live
            .values()
            .filter(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .and_then(topo::node_number)
                    .is_some_and(|n| self.state.nodes.iter().any(|node| node.number == n))
            })
            .filter(|p| !self.state.pods.contains_key(&pod_key(p)))
            .map(|p| (*p).clone())
            .collect();
        if !new.is_empty() {
            self.start_pods(new)?;
            changed = true;
        }
        // Labels and annotations follow the API.
        for p in live.values() {
            if let Some(s) = self.state.pods.get_mut(&pod_key(p)) {
                s.pod.metadata = p.metadata.clone();
                super::cluster::strip_meta(&mut s.pod.metadata);
            }
        }
        self.save()?;
        Ok(changed)
    }

    fn list_pods(&self) -> Result<Vec<Pod>> {
        let v = self.kubectl_json(&["get", "pods", "--all-namespaces"])?;
        v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| {
                serde_json::from_value(i.clone()).context("decoding a Pod from the API server")
            })
            .collect()
    }

    pub(super) fn cni_config(&self, node: &cluster::NodeState) -> Value {
        // One range set per family: host-local hands out an address of each.
        let families = self.state.ip_family.families();
        let ranges: Vec<Value> = families
            .iter()
            .map(|f| json!([{"subnet": topo::node_pods(node.number, *f).to_string()}]))
            .collect();
        let routes: Vec<Value> = families
            .iter()
            .map(|f| {
                json!({"dst": match f {
                    Family::V4 => "0.0.0.0/0",
                    Family::V6 => "::/0",
                }})
            })
            .collect();
        let ipam = json!({
            "type": "host-local",
            "dataDir": Files::of(self).cni_state(&node.name),
            "ranges": ranges,
            "routes": routes,
        });
        if self.kube().cni == CniShape::Bridge {
            // isDefaultGateway installs the pod's default route itself.
            let mut ipam = ipam;
            ipam.as_object_mut().expect("object").remove("routes");
            return json!({
                "cniVersion": "0.4.0",
                "name": "cbr0",
                "type": "bridge",
                "bridge": CNI_BRIDGE,
                "isGateway": true,
                "isDefaultGateway": true,
                "hairpinMode": true,
                "ipMasq": false,
                "mtu": 1500,
                "ipam": ipam,
            });
        }
        json!({
            "cniVersion": "0.4.0",
            "name": "kindnet",
            "type": "ptp",
            "ipMasq": false,
            "mtu": 1500,
            "ipam": ipam,
        })
    }

    /// The CNI binary directory of the lab's pods: Debian's plugins and, when the lab runs
    /// agents, `policy-agent-cni` (the agent's binary under that name), as on a node.
    pub(super) fn cni_bin_dir(&self) -> PathBuf {
        self.paths.dir.join("cni").join("bin")
    }

    /// Writes [`Self::cni_bin_dir`] and, per node, `cni/<node>.conflist`: the chain the lab runs
    /// for that node's pods (after loopback), for anything that plays the runtime the same way.
    fn write_cni_chain(&self) -> Result<()> {
        let bin = self.cni_bin_dir();
        std::fs::create_dir_all(&bin)?;
        let mut targets: Vec<(String, PathBuf)> = std::fs::read_dir(CNI_BIN_DIR)
            .with_context(|| {
                format!("the CNI plugins ({CNI_BIN_DIR}, containernetworking-plugins)")
            })?
            .filter_map(Result::ok)
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        if let Some(agent) = &self.state.agent_bin {
            targets.push((CNI_CHAINED.to_string(), agent.clone()));
        }
        for (name, target) in targets {
            let link = bin.join(&name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link)
                .with_context(|| format!("linking {} to {}", link.display(), target.display()))?;
        }
        for node in &self.state.nodes {
            let mut plugins = vec![self.cni_config(node)];
            plugins.extend(self.cni_chained(node, None));
            let list = conflist(plugins);
            std::fs::write(
                self.paths
                    .dir
                    .join("cni")
                    .join(format!("{}.conflist", node.name)),
                serde_json::to_string_pretty(&list)?,
            )?;
        }
        Ok(())
    }

    /// The configuration of the chained plugin after [`Self::cni_config`]'s (with the result it
    /// follows, for ADD), when the lab runs agents.
    fn cni_chained(&self, node: &cluster::NodeState, prev: Option<&Value>) -> Option<Value> {
        self.state.agent_bin.as_ref()?;
        let mut conf = json!({
            "cniVersion": "0.4.0",
            "name": self.cni_config(node)["name"],
            "type": CNI_CHAINED,
            "socket": self.paths.cni_socket(&node.name),
            "timeoutSeconds": 10,
        });
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        Some(conf)
    }

    /// Runs one CNI plugin in the node's namespace with the CNI protocol; returns its result.
    fn cni(
        &self,
        node: &cluster::NodeState,
        command: &str,
        config: &Value,
        pod: &PodState,
        ifname: &str,
    ) -> Result<Value> {
        let plugin = config["type"].as_str().unwrap_or_default().to_string();
        let bin_dir = self.cni_bin_dir();
        let mut cmd = Command::new(bin_dir.join(&plugin));
        cmd.env("CNI_COMMAND", command)
            .env(
                "CNI_CONTAINERID",
                pod.pod.metadata.uid.as_deref().unwrap_or_default(),
            )
            .env("CNI_NETNS", net::netns_path(&pod.netns))
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", &bin_dir)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                    pod.pod.metadata.namespace.as_deref().unwrap_or_default(),
                    pod.pod.metadata.name.as_deref().unwrap_or_default()
                ),
            );
        net::set_netns(&mut cmd, &node.netns, NetnsMode::Net)?;
        let done = net::output_of(&mut cmd, Some(&config.to_string()))?;
        let out = String::from_utf8_lossy(&done.stdout).into_owned();
        if !done.status.success() {
            // A plugin reports its error as a JSON object on stdout (CNI spec).
            bail!(
                "CNI {command} ({plugin}) for pod {} failed ({}): {} {}",
                pod_key(&pod.pod),
                done.status,
                out.trim(),
                String::from_utf8_lossy(&done.stderr).trim()
            );
        }
        if out.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&out).with_context(|| format!("CNI {plugin} result {out:?}"))
    }

    /// Pod networks through the CNI chain (loopback, then ptp with host-local IPAM), in
    /// parallel; then the responders and the pod statuses.
    fn start_pods(&mut self, pods: Vec<Pod>) -> Result<()> {
        let mut staged = Vec::new();
        for mut pod in pods {
            let node = topo::node_number(
                pod.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .unwrap_or_default(),
            )
            .expect("filtered to lab nodes");
            let id = self.state.next_pod_id;
            self.state.next_pod_id += 1;
            super::cluster::strip_meta(&mut pod.metadata);
            staged.push(PodState {
                pod,
                id,
                node,
                ips: Vec::new(),
                netns: self.names.pod_ns(id),
                veth: String::new(),
                responder_pid: None,
            });
        }
        let results: Vec<Result<PodState>> = thread::scope(|s| {
            let handles: Vec<_> = staged
                .iter()
                .map(|p| {
                    let lab = &*self;
                    s.spawn(move || lab.pod_network(p.clone()))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("panicked"))))
                .collect()
        });
        let mut ready = Vec::new();
        let mut failure = None;
        for r in results {
            match r {
                Ok(p) => ready.push(p),
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        for p in &ready {
            self.state.pods.insert(pod_key(&p.pod), p.clone());
        }
        if let Some(e) = failure {
            self.save()?;
            return Err(e);
        }
        let jobs: Vec<(String, super::serve::ServeArgs)> = ready
            .iter()
            .map(|p| {
                (
                    p.netns.clone(),
                    super::apply::serve_args(&pod_key(&p.pod), &p.pod),
                )
            })
            .collect();
        let pids = start_responders(&self.names.prefix, &jobs, &self.paths.logs())?;
        for (p, pid) in ready.iter().zip(pids) {
            self.state
                .pods
                .get_mut(&pod_key(&p.pod))
                .expect("inserted")
                .responder_pid = Some(pid);
        }
        // The kubelet's status write: addresses, phase, conditions.
        let results: Vec<Result<()>> = thread::scope(|s| {
            let handles: Vec<_> = ready
                .iter()
                .map(|p| {
                    let lab = &*self;
                    s.spawn(move || lab.write_pod_status(p))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("panicked"))))
                .collect()
        });
        for p in &ready {
            let status = pod_status(&p.ips, self.host_ips(p.node));
            let st = self.state.pods.get_mut(&pod_key(&p.pod)).expect("inserted");
            st.pod.status = Some(serde_json::from_value(status)?);
        }
        results.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    fn pod_network(&self, mut p: PodState) -> Result<PodState> {
        let node = self
            .state
            .nodes
            .iter()
            .find(|n| n.number == p.node)
            .expect("lab node")
            .clone();
        net::add_netns(&p.netns)?;
        cluster::set_families(&p.netns, self.state.ip_family, false)?;
        let lo = json!({"cniVersion": "0.4.0", "name": "lo", "type": "loopback"});
        self.cni(&node, "ADD", &lo, &p, "lo")?;
        let result = self.cni(&node, "ADD", &self.cni_config(&node), &p, "eth0")?;
        // Chained after it, as the agent chains itself on a real node: ADD returns once the
        // agent enforces the pod, so the responders below start under policy.
        if let Some(chained) = self.cni_chained(&node, Some(&result)) {
            self.cni(&node, "ADD", &chained, &p, "eth0")?;
        }
        // host-local hands out an address per range set, in the order of the lab's families.
        let ips: Vec<std::net::IpAddr> = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
            .collect();
        let families = self.state.ip_family.families();
        let mut addrs = Vec::new();
        for f in families {
            let ip = ips
                .iter()
                .copied()
                .find(|ip| Family::of(*ip) == *f)
                .ok_or_else(|| {
                    anyhow!(
                        "CNI {:?} returned no {f} address for pod {}: {result}",
                        self.kube().cni,
                        pod_key(&p.pod)
                    )
                })?;
            addrs.push(ip);
        }
        let host_if = result["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["sandbox"].as_str().is_none_or(str::is_empty) && i["name"] != CNI_BRIDGE)
            .and_then(|i| i["name"].as_str())
            .ok_or_else(|| {
                anyhow!(
                    "CNI ptp returned no host interface for pod {}: {result}",
                    pod_key(&p.pod)
                )
            })?;
        p.ips = addrs;
        p.veth = host_if.to_string();
        Ok(p)
    }

    fn write_pod_status(&self, p: &PodState) -> Result<()> {
        let patch = json!({"status": pod_status(&p.ips, self.host_ips(p.node))});
        self.kubectl(
            &[
                "patch",
                "pod",
                p.pod.metadata.name.as_deref().unwrap_or_default(),
                "--namespace",
                p.pod.metadata.namespace.as_deref().unwrap_or_default(),
                "--subresource=status",
                "--type=merge",
                "-p",
                &patch.to_string(),
            ],
            None,
        )
        .with_context(|| format!("writing the status of pod {}", pod_key(&p.pod)))
        .map(|_| ())
    }

    /// CNI DEL (best effort: the namespace goes anyway).
    fn cni_del(&self, p: &PodState) {
        let Some(node) = self.state.nodes.iter().find(|n| n.number == p.node) else {
            return;
        };
        if let Some(chained) = self.cni_chained(node, None)
            && let Err(e) = self.cni(node, "DEL", &chained, p, "eth0")
        {
            eprintln!("warning: {e:#}");
        }
        if let Err(e) = self.cni(node, "DEL", &self.cni_config(node), p, "eth0") {
            eprintln!("warning: {e:#}");
        }
    }

    // ---- convergence ------------------------------------------------------------------------

    /// Mirrors the API server's objects into the lab state (for `get`, `probe` and the
    /// conformance suite) and returns the snapshot.
    fn kube_refresh(&mut self) -> Result<Snapshot> {
        let v = self.kubectl_json(&[
            "get",
            "namespaces,pods,services,nodes,networkpolicies.networking.k8s.io,endpointslices.discovery.k8s.io",
            "--all-namespaces",
        ])?;
        let snap = Snapshot::from_list(&v)?;
        self.state.namespaces = snap
            .of("Namespace")
            .map(|o| {
                let mut ns: Namespace = serde_json::from_value(o.clone())?;
                super::cluster::strip_meta(&mut ns.metadata);
                Ok((ns.metadata.name.clone().unwrap_or_default(), ns))
            })
            .collect::<Result<_>>()?;
        self.state.services = snap
            .of("Service")
            .map(|o| {
                let mut s: Service = serde_json::from_value(o.clone())?;
                super::cluster::strip_meta(&mut s.metadata);
                Ok((key_of(o), s))
            })
            .collect::<Result<_>>()?;
        self.state.policies = snap
            .of("NetworkPolicy")
            .map(|o| {
                let mut np: NetworkPolicy = serde_json::from_value(o.clone())?;
                super::cluster::strip_meta(&mut np.metadata);
                Ok((key_of(o), np))
            })
            .collect::<Result<_>>()?;
        self.save()?;
        Ok(snap)
    }

    /// Runs the kubelet until nothing changes, then waits until EndpointSlices match the pods,
    /// every kube-proxy has programmed them and every agent enforces exactly the API server's
    /// objects.
    pub(crate) fn kube_converge(&mut self) -> Result<cluster::Converged> {
        let started = Instant::now();
        let deadline = started + self.converge_timeout;
        while self.kubelet_sync()? {}
        let mut last;
        loop {
            let snap = self.kube_refresh()?;
            let waiting = match self.slices_settled(&snap) {
                Err(e) => Some(format!("EndpointSlices: {e}")),
                Ok(endpoints) => match self.proxies_programmed(&endpoints) {
                    Err(e) => Some(format!("kube-proxy: {e:#}")),
                    Ok(()) => {
                        let agents = self.agents();
                        if agents.is_empty() && self.kube().peer_enforcer {
                            // kube-network-policies reports no enforced state: give its
                            // informers a fixed time to catch up.
                            thread::sleep(PEER_SETTLE);
                            self.state.revision += 1;
                            self.save()?;
                            return Ok(cluster::Converged {
                                revision: self.state.revision,
                                took: Some(started.elapsed()),
                                agents: self.state.nodes.len(),
                                warnings: vec![format!(
                                    "kube-network-policies reports no enforced state; the lab waited {} ms after the API server, EndpointSlices and kube-proxy settled",
                                    PEER_SETTLE.as_millis()
                                )],
                            });
                        }
                        if agents.is_empty() {
                            return Ok(cluster::Converged {
                                revision: self.state.revision,
                                took: None,
                                agents: 0,
                                warnings: vec![],
                            });
                        }
                        let want = snap.digest;
                        let wait = Duration::from_secs(2)
                            .min(deadline.saturating_duration_since(Instant::now()));
                        match agent::wait_until(
                            &agents,
                            wait,
                            &format!("the objects of digest {:016x}", want.digest),
                            |s| s.enforced_objects == want,
                        ) {
                            Ok((statuses, _)) => {
                                self.state.revision += 1;
                                self.save()?;
                                let warnings = statuses
                                    .iter()
                                    .zip(&agents)
                                    .flat_map(|(s, a)| {
                                        s.errors
                                            .iter()
                                            .map(move |e| format!("agent on {}: {e}", a.node))
                                    })
                                    .collect();
                                return Ok(cluster::Converged {
                                    revision: self.state.revision,
                                    took: Some(started.elapsed()),
                                    agents: agents.len(),
                                    warnings,
                                });
                            }
                            Err(e) => Some(format!("{e:#}")),
                        }
                    }
                },
            };
            last = waiting.unwrap_or_default();
            self.trace(&format!("converge: waiting for {last}"), started);
            if Instant::now() >= deadline {
                bail!(
                    "the lab did not converge within {:?}: {last}",
                    self.converge_timeout
                );
            }
            self.kubelet_sync()?;
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// One change through the real API, timed from just before `kubectl apply` (or `delete`)
    /// until every agent enforces the API server's objects (the benchmark of enforcement
    /// latency through a real API server; the object must not change pods or Services).
    pub fn timed_change(&mut self, object: &Value, delete: bool) -> Result<Duration> {
        let started = Instant::now();
        let text = object.to_string();
        if delete {
            self.kubectl(&["delete", "-f", "-", "--wait=false"], Some(&text))?;
        } else {
            self.kubectl(&["apply", "-f", "-"], Some(&text))?;
        }
        let want = self.kube_refresh()?.digest;
        agent::wait_until(
            &self.agents(),
            self.converge_timeout,
            &format!("digest {:016x}", want.digest),
            |s| s.enforced_objects == want,
        )?;
        Ok(started.elapsed())
    }

    /// Every Service with a selector has exactly the endpoints its pods imply (the lab's own
    /// endpoint computation, which the manifest mode publishes); returns every ready endpoint of
    /// every Service as kube-proxy should program it: (protocol, address, port).
    fn slices_settled(
        &self,
        snap: &Snapshot,
    ) -> std::result::Result<BTreeSet<(String, std::net::IpAddr, u16)>, String> {
        let views = self.pod_views();
        let selected: BTreeMap<&String, &Service> = self
            .state
            .services
            .iter()
            .filter(|(_, s)| {
                s.spec
                    .as_ref()
                    .and_then(|s| s.selector.as_ref())
                    .is_some_and(|m| !m.is_empty())
            })
            .collect();
        let mut want: BTreeSet<(String, String, String, std::net::IpAddr, u16)> = BTreeSet::new();
        for sp in services::service_ports(selected.iter().map(|(k, s)| (*k, *s)), &views) {
            for (_, ip, tp) in &sp.endpoints {
                want.insert((
                    sp.service.clone(),
                    sp.port_name.clone(),
                    sp.protocol.clone(),
                    *ip,
                    *tp,
                ));
            }
        }
        let mut have = BTreeSet::new();
        let mut all = BTreeSet::new();
        for slice in snap.of("EndpointSlice") {
            let ns = slice["metadata"]["namespace"].as_str().unwrap_or_default();
            let Some(svc) = slice["metadata"]["labels"]["kubernetes.io/service-name"].as_str()
            else {
                continue;
            };
            let key = format!("{ns}/{svc}");
            for ep in slice["endpoints"].as_array().into_iter().flatten() {
                if ep["conditions"]["ready"] == false {
                    continue;
                }
                for addr in ep["addresses"].as_array().into_iter().flatten() {
                    let Some(ip) = addr
                        .as_str()
                        .and_then(|a| a.parse::<std::net::IpAddr>().ok())
                    else {
                        continue;
                    };
                    for port in slice["ports"].as_array().into_iter().flatten() {
                        let (Some(p), proto) = (
                            port["port"].as_u64(),
                            port["protocol"].as_str().unwrap_or("TCP"),
                        ) else {
                            continue;
                        };
                        all.insert((proto.to_string(), ip, p as u16));
                        if selected.contains_key(&key) {
                            have.insert((
                                key.clone(),
                                port["name"].as_str().unwrap_or("").to_string(),
                                proto.to_string(),
                                ip,
                                p as u16,
                            ));
                        }
                    }
                }
            }
        }
        if want != have {
            let missing = want.difference(&have).count();
            let extra = have.difference(&want).count();
            return Err(format!("{missing} endpoints missing, {extra} not expected"));
        }
        Ok(all)
    }

    /// Every node's kube-proxy DNATs to exactly these endpoints (its proxier of each family).
    fn proxies_programmed(
        &self,
        endpoints: &BTreeSet<(String, std::net::IpAddr, u16)>,
    ) -> Result<()> {
        let mode = self.kube().proxy_mode;
        for node in &self.state.nodes {
            let mut have = BTreeSet::new();
            for &f in self.state.ip_family.families() {
                let (save, table) = match f {
                    Family::V4 => ("iptables-save", "ip"),
                    Family::V6 => ("ip6tables-save", "ip6"),
                };
                let args: Vec<&str> = match mode {
                    ProxyMode::Iptables => vec![save, "-t", "nat"],
                    ProxyMode::Nftables => vec!["nft", "list", "table", table, "kube-proxy"],
                };
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &node.netns]).args(&args);
                let text = match mode {
                    ProxyMode::Iptables => net::output(&mut cmd, None)?,
                    // The table appears with kube-proxy's first sync.
                    ProxyMode::Nftables => net::output(&mut cmd, None).unwrap_or_default(),
                };
                have.extend(dnat_targets(&text));
            }
            if &have != endpoints {
                bail!(
                    "{} has {} of {} endpoints programmed",
                    node.name,
                    have.intersection(endpoints).count(),
                    endpoints.len()
                );
            }
        }
        Ok(())
    }
}

/// kube-network-policies hands packets to userspace with the nftables `queue` expression; a
/// kernel without it (`CONFIG_NFT_QUEUE`) rejects every ruleset of the controller, which then
/// enforces nothing. Checked in a throwaway table of a lab node before it is started.
fn nft_queue_supported(netns: &str) -> Result<()> {
    let probe = "table inet lab-queue-probe {\n\tchain c {\n\t\tqueue num 100 bypass\n\t}\n}\ndelete table inet lab-queue-probe\n";
    net::nft(netns, probe).map_err(|e| {
        anyhow!(
            "kube-network-policies cannot enforce on this kernel: the nftables queue expression (CONFIG_NFT_QUEUE) is missing, so every ruleset it writes is rejected and all traffic would pass ({e:#})"
        )
    })
}

/// (protocol, address, port) of every DNAT rule of kube-proxy's ruleset: iptables-save's
/// `-p tcp … -j DNAT --to-destination IP:PORT`, nftables' `meta l4proto tcp dnat to IP:PORT`
/// (IPv6: `[IP]:PORT`).
pub fn dnat_targets(ruleset: &str) -> BTreeSet<(String, std::net::IpAddr, u16)> {
    let mut out = BTreeSet::new();
    for line in ruleset.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let target = words
            .windows(2)
            .find(|w| w[0] == "--to-destination" || (w[0] == "to" && words.contains(&"dnat")))
            .map(|w| w[1]);
        let proto = words
            .windows(2)
            .find(|w| w[0] == "-p" || w[0] == "l4proto")
            .map(|w| w[1].to_uppercase());
        if let (Some(t), Some(p)) = (target, proto)
            && let Ok(to) = t.parse::<SocketAddr>()
        {
            out.insert((p, to.ip(), to.port()));
        }
    }
    out
}

fn resource(kind: Kind) -> &'static str {
    match kind {
        Kind::Namespace => "namespace",
        Kind::Pod => "pod",
        Kind::Service => "service",
        Kind::NetworkPolicy => "networkpolicy.networking.k8s.io",
    }
}

fn pod_key(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or_default(),
        p.metadata.name.as_deref().unwrap_or_default()
    )
}

fn key_of(o: &Value) -> String {
    format!(
        "{}/{}",
        o["metadata"]["namespace"].as_str().unwrap_or_default(),
        o["metadata"]["name"].as_str().unwrap_or_default()
    )
}

fn pod_status(ips: &[std::net::IpAddr], hosts: &[std::net::IpAddr]) -> Value {
    let now = now_rfc3339();
    let cond = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
    let list = |a: &[std::net::IpAddr]| -> Vec<Value> {
        a.iter().map(|ip| json!({"ip": ip.to_string()})).collect()
    };
    json!({
        "phase": "Running",
        "podIP": ips.first().map(ToString::to_string),
        "podIPs": list(ips),
        "hostIP": hosts.first().map(ToString::to_string),
        "hostIPs": list(hosts),
        "startTime": now,
        "conditions": [cond("PodReadyToStartContainers"), cond("Initialized"), cond("Ready"),
                       cond("ContainersReady"), cond("PodScheduled")],
    })
}

/// The current time as RFC 3339 (UTC, seconds).
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The API server's objects of the kinds the agents watch, and their digest.
struct Snapshot {
    items: Vec<Value>,
    /// Count and digest, as the agents report them.
    digest: ObjectsDigest,
}

impl Snapshot {
    fn from_list(list: &Value) -> Result<Snapshot> {
        let items: Vec<Value> = list["items"].as_array().cloned().unwrap_or_default();
        let mut digest = ObjectsDigest::default();
        for i in &items {
            let kind = i["kind"]
                .as_str()
                .ok_or_else(|| anyhow!("a listed object without kind"))?;
            let namespaced = !matches!(kind, "Namespace" | "Node");
            let m = &i["metadata"];
            digest.add(policy_common::digest::object_term(
                kind,
                if namespaced {
                    m["namespace"].as_str().unwrap_or_default()
                } else {
                    ""
                },
                m["name"].as_str().unwrap_or_default(),
                m["resourceVersion"].as_str().unwrap_or_default(),
            ));
        }
        Ok(Snapshot { items, digest })
    }

    fn of<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.items.iter().filter(move |i| i["kind"] == kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnat_targets_of_both_proxy_modes() {
        let iptables = "-A KUBE-SEP-ABC -p tcp -m comment --comment \"x/s:http\" -m tcp -j DNAT --to-destination 10.244.1.2:80\n\
                        -A KUBE-SEP-DEF -p udp -m comment --comment \"x/s:dns\" -m udp -j DNAT --to-destination 10.244.2.3:53\n\
                        -A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -j KUBE-SVC-X\n";
        let nft = "\tchain endpoint-ABC-x/s/tcp/http__10.244.1.2/80 {\n\
                   \t\tip saddr 10.244.1.2 jump mark-for-masquerade\n\
                   \t\tmeta l4proto tcp dnat to 10.244.1.2:80\n\t}\n\
                   \t\tmeta l4proto sctp dnat to 10.244.2.3:9000\n";
        let want = |v: &[(&str, [u8; 4], u16)]| -> BTreeSet<(String, std::net::IpAddr, u16)> {
            v.iter()
                .map(|(p, a, port)| (p.to_string(), Ipv4Addr::from(*a).into(), *port))
                .collect()
        };
        assert_eq!(
            dnat_targets(iptables),
            want(&[("TCP", [10, 244, 1, 2], 80), ("UDP", [10, 244, 2, 3], 53)])
        );
        assert_eq!(
            dnat_targets(nft),
            want(&[
                ("TCP", [10, 244, 1, 2], 80),
                ("SCTP", [10, 244, 2, 3], 9000)
            ])
        );
        // IPv6 proxiers write the address in brackets.
        let v6 = "-A KUBE-SEP-GHI -p tcp -m tcp -j DNAT --to-destination [fd00:10:244:1::2]:80\n\
                  \t\tmeta l4proto udp dnat to [fd00:10:244:2::3]:53\n";
        assert_eq!(
            dnat_targets(v6),
            [
                ("TCP".to_string(), "fd00:10:244:1::2".parse().unwrap(), 80),
                ("UDP".to_string(), "fd00:10:244:2::3".parse().unwrap(), 53)
            ]
            .into()
        );
    }

    #[test]
    fn rfc3339_shape() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
        assert!(t.starts_with("20"), "{t}");
    }
}
