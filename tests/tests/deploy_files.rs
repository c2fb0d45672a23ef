//! Offline checks of everything around the manifests: the Dockerfile, the kind cluster and its preparation scripts,
//! the k3s configuration, the kind e2e workflow (which cannot run here, so it must be right by construction), and
//! deploy/README.md, the install guide users follow. Each names files, images, paths and flags that must exist
//! and agree with each other and with the agent.

mod deploy_support;

use std::{collections::BTreeSet, os::unix::fs::PermissionsExt, process::Command};

use deploy_support::{agent, only, read, render, repo_path, yaml_file};
use serde_json::Value;

const WORKFLOW: &str = ".github/workflows/e2e-kind.yml";
const PREPARE: &str = "deploy/kind/prepare-cluster.sh";
const CHECK: &str = "deploy/kind/check-no-builtin-enforcement.sh";
const SCRIPTS: &[&str] = &[PREPARE, CHECK];

/// Flags of other tools the README and workflow pass (the agent's own are checked against its clap definition).
const TOOL_FLAGS: &[(&str, &str)] = &[
    ("--config", "kind create cluster"),
    ("--name", "kind"),
    ("--disable-network-policy", "k3s server"),
    ("--focus", "ginkgo"),
    ("--skip", "ginkgo"),
    ("--flavor", "cargo xtask e2e"),
];

fn kind_image() -> String {
    let objects = render("deploy/overlays/kind");
    only(&objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .expect("kind overlay image")
        .to_owned()
}

fn daemonset_field(pointer: &str) -> Value {
    let objects = render("deploy/base");
    only(&objects, "DaemonSet")
        .pointer(pointer)
        .cloned()
        .unwrap_or_else(|| panic!("DaemonSet has no {pointer}"))
}

/// The workspace's `rust-version` (the toolchain every build uses).
fn rust_version() -> String {
    let manifest = read(&repo_path("Cargo.toml"));
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("rust-version in Cargo.toml")
}

/// The Kubernetes minor version the agent is built against, from its k8s-openapi feature (`v1_34` -> `1.34`).
fn agent_kubernetes_minor() -> String {
    let manifest = read(&repo_path("policy-agent/Cargo.toml"));
    let line = manifest
        .lines()
        .find(|l| l.starts_with("k8s-openapi"))
        .expect("policy-agent depends on k8s-openapi");
    let feature = line
        .split('"')
        .find(|s| s.starts_with("v1_"))
        .expect("a k8s-openapi version feature");
    feature.trim_start_matches('v').replace('_', ".")
}

/// The default cluster name of a kind script (`cluster="${1:-NAME}"`).
fn script_default_cluster(script: &str) -> String {
    read(&repo_path(script))
        .lines()
        .find_map(|l| l.strip_prefix("cluster=\"${1:-"))
        .and_then(|l| l.strip_suffix("}\""))
        .unwrap_or_else(|| panic!("{script}: no cluster=\"${{1:-NAME}}\" line"))
        .to_owned()
}

/// Paths of this repository a text names (`deploy/…`, `.github/…`, `Dockerfile`).
fn repository_paths(text: &str) -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    for word in text.split(|c: char| c.is_whitespace() || "`'\"()[]|,;:=".contains(c)) {
        let word = word.trim_end_matches(['.', '*']);
        if word.starts_with("deploy/") || word.starts_with(".github/") || word == "Dockerfile" {
            paths.insert(word.to_owned());
        }
    }
    paths
}

/// `--flags` a text passes: every `--word` that starts a word.
fn flags_in(text: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    for (at, _) in text.match_indices("--") {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '-') {
            continue;
        }
        let name: String = text[at + 2..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
            .collect();
        if name.starts_with(|c: char| c.is_ascii_lowercase()) {
            flags.insert(format!("--{name}"));
        }
    }
    flags
}

/// Positions of `needles` in `text`, which must appear in this order.
fn assert_in_order(text: &str, needles: &[&str], what: &str) {
    let mut from = 0;
    for needle in needles {
        match text[from..].find(needle) {
            Some(at) => from += at + needle.len(),
            None => panic!(
                "{what}: `{needle}` is missing or out of order (expected order: {needles:?})"
            ),
        }
    }
}

#[test]
fn kind_cluster_has_one_control_plane_two_workers_and_kindnet() {
    for (file, family) in KIND_CONFIGS {
        let config = &yaml_file(&repo_path(file))[0];
        assert_eq!(config["kind"], "Cluster", "{file}");
        assert_eq!(config["apiVersion"], "kind.x-k8s.io/v1alpha4", "{file}");
        let roles: Vec<&str> = config["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| n["role"].as_str().expect("role"))
            .collect();
        assert_eq!(roles, ["control-plane", "worker", "worker"], "{file}");
        assert_ne!(
            config["networking"]["disableDefaultCNI"], true,
            "{file}: kindnet's ptp pod networking is what the agent attaches to"
        );
        assert_eq!(config["networking"]["kubeProxyMode"], "iptables", "{file}");
        assert_eq!(config["networking"]["ipFamily"], family, "{file}");
    }
}

/// The kind configurations, one per IP family, and the family each sets.
const KIND_CONFIGS: [(&str, &str); 3] = [
    ("deploy/kind/cluster.yaml", "ipv4"),
    ("deploy/kind/cluster-ipv6.yaml", "ipv6"),
    ("deploy/kind/cluster-dual.yaml", "dual"),
];

#[test]
fn k3s_configuration_disables_the_embedded_policy_controller() {
    let config = &yaml_file(&repo_path("deploy/k3s/config.yaml"))[0];
    assert_eq!(config["disable-network-policy"], true);
    assert_eq!(config["flannel-backend"], "vxlan");
    let readme = read(&repo_path("deploy/README.md"));
    assert!(
        readme.contains("sudo cp deploy/k3s/config.yaml /etc/rancher/k3s/config.yaml"),
        "the README installs deploy/k3s/config.yaml where k3s reads it"
    );
}

#[test]
fn kind_scripts_are_executable_valid_bash_and_pin_what_they_rely_on() {
    for script in SCRIPTS {
        let path = repo_path(script);
        let mode = std::fs::metadata(&path)
            .expect("script exists")
            .permissions()
            .mode();
        assert_ne!(mode & 0o111, 0, "{script} is not executable");
        let status = Command::new("bash")
            .arg("-n")
            .arg(&path)
            .status()
            .expect("running bash -n");
        assert!(status.success(), "{script}: bash -n reports a syntax error");
        assert!(
            read(&path).contains("set -euo pipefail"),
            "{script}: must stop at the first failure"
        );
        let output = Command::new("shellcheck").arg(&path).output().expect(
            "shellcheck is required: `cargo xtask setup` installs it (Debian package shellcheck)",
        );
        assert!(
            output.status.success(),
            "shellcheck {script}:\n{}",
            String::from_utf8_lossy(&output.stdout)
        );
        assert_eq!(
            script_default_cluster(script),
            "policy-agent",
            "{script}: default cluster name"
        );
    }
    let prepare = read(&repo_path(PREPARE));
    // kube-network-policies' e2e workflow swaps in this kindnetd (the last one without embedded policies).
    assert!(
        prepare.contains(
            "kindnetd_without_policies=\"docker.io/kindest/kindnetd:v20230809-80a64d96\""
        )
    );
    assert!(prepare.contains("set image daemonset/kindnet \"kindnet-cni="));
    assert!(prepare.contains("kindnet_policy_table=\"kindnet-network-policies\""));
    assert!(prepare.contains("mount -t bpf"));
}

#[test]
fn dockerfile_builds_with_the_workspace_toolchain_setup() {
    let dockerfile = read(&repo_path("Dockerfile"));
    let rust = rust_version();
    assert!(
        dockerfile.contains(&format!("ARG RUST_VERSION={rust}\n")),
        "Dockerfile: ARG RUST_VERSION must be the workspace rust-version {rust}"
    );
    assert!(dockerfile.contains("FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build"));
    let install = dockerfile
        .lines()
        .find(|l| l.contains("apt-get install"))
        .expect("an apt-get install line");
    let packages: BTreeSet<&str> = install
        .split_whitespace()
        .skip_while(|w| *w != "--no-install-recommends")
        .skip(1)
        .map(|w| w.trim_end_matches(';'))
        .filter(|w| *w != "\\")
        .collect();
    assert_eq!(
        packages,
        BTreeSet::from([
            "llvm-22-dev",
            "libpolly-22-dev",
            "libzstd-dev",
            "zlib1g-dev"
        ]),
        "Dockerfile apt packages"
    );
    for needle in [
        "rustup component add rust-src",
        "LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --version 0.13.0 --no-default-features --features llvm-22",
        "cargo build --release --locked --package policy-agent --bin policy-agent",
        "rustup run stable rustc -vV | grep -q \"^release: ${RUST_VERSION}\\.\"",
    ] {
        assert!(dockerfile.contains(needle), "Dockerfile lacks `{needle}`");
    }
    let agent_manifest = read(&repo_path("policy-agent/Cargo.toml"));
    assert!(
        agent_manifest.contains("[[bin]]\nname = \"policy-agent\""),
        "the Dockerfile copies the policy-agent binary"
    );
    let runtime = dockerfile
        .rsplit("\nFROM ")
        .next()
        .expect("a runtime stage");
    assert!(
        runtime.starts_with("gcr.io/distroless/cc-debian12\n"),
        "runtime base"
    );
    assert!(runtime.contains("ENTRYPOINT [\"/usr/local/bin/policy-agent\"]"));
    let ignore = read(&repo_path(".dockerignore"));
    assert!(
        ignore.lines().any(|l| l == "target"),
        ".dockerignore must keep target/ out of the context"
    );

    // The same toolchain setup as the repository's own (`cargo xtask setup`, xtask/src/setup.rs): every build
    // dependency it installs (LLVM 22 and the -dev libraries bpf-linker links), the same bpf-linker.
    let setup = read(&repo_path("xtask/src/setup.rs"));
    let setup_packages = rust_str_list(&setup, "APT_PACKAGES");
    let build_packages: BTreeSet<&str> = setup_packages
        .iter()
        .map(String::as_str)
        .filter(|p| p.ends_with("-dev"))
        .collect();
    assert_eq!(
        packages, build_packages,
        "the Dockerfile installs other build packages than xtask setup ({setup_packages:?})"
    );
    let linker = rust_str_const(&setup, "BPF_LINKER_VERSION");
    assert!(
        dockerfile.contains(&format!(
            "cargo install --locked bpf-linker --version {linker} "
        )),
        "the Dockerfile's bpf-linker differs from xtask setup's {linker}"
    );
    for needle in [
        "\"--locked\"",
        "\"--no-default-features\", \"--features\", \"llvm-22\"",
        ".env(\"LLVM_PREFIX\", \"/usr/lib/llvm-22\")",
        "\"component\", \"add\", \"rust-src\"",
    ] {
        assert!(
            setup.contains(needle),
            "xtask setup no longer has {needle}: update the Dockerfile to match"
        );
    }
}

/// The string items of a `const NAME: &[&str] = &[...];` in Rust source.
fn rust_str_list(source: &str, name: &str) -> Vec<String> {
    let start = source
        .find(&format!("const {name}: &[&str] = &["))
        .unwrap_or_else(|| panic!("no const {name}"));
    let body = &source[start..];
    let body =
        &body[body.find("= &[").expect("list start") + 4..body.find("];").expect("list end")];
    body.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .flat_map(|l| {
            l.split('"')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The value of a `const NAME: &str = "...";` in Rust source.
fn rust_str_const(source: &str, name: &str) -> String {
    source
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("const {name}: &str = \"")))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no const {name}"))
        .to_owned()
}

#[test]
fn workflow_is_consistent_with_the_repository() {
    let text = read(&repo_path(WORKFLOW));
    let header: String = text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        header.contains("cannot run on the machines") && header.contains("correct by construction"),
        "{WORKFLOW}: the header must say it cannot run here and how it is kept correct"
    );
    let workflow = &yaml_file(&repo_path(WORKFLOW))[0];
    let env = &workflow["env"];

    let version = env["K8S_VERSION"].as_str().expect("K8S_VERSION");
    let minor = agent_kubernetes_minor();
    assert!(
        version.starts_with(&format!("v{minor}.")),
        "{WORKFLOW}: K8S_VERSION {version} differs from the agent's k8s-openapi API version {minor}"
    );
    let node_image = env["KIND_NODE_IMAGE"].as_str().expect("KIND_NODE_IMAGE");
    assert!(
        node_image.starts_with(&format!("kindest/node:{version}@sha256:")),
        "{WORKFLOW}: node image {node_image} is not Kubernetes {version}, pinned by digest"
    );
    assert_eq!(
        env["IMAGE"],
        kind_image().as_str(),
        "{WORKFLOW}: IMAGE differs from the kind overlay's image"
    );
    assert_eq!(
        env["KIND_CLUSTER_NAME"],
        script_default_cluster(PREPARE).as_str(),
        "{WORKFLOW}: cluster name differs from the scripts' default"
    );

    let job_script = |job: &str| -> String {
        workflow["jobs"][job]["steps"]
            .as_array()
            .unwrap_or_else(|| panic!("{WORKFLOW}: job {job} has no steps"))
            .iter()
            .filter_map(|s| s["run"].as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let netpol = job_script("netpol");
    let namespace = daemonset_field("/metadata/namespace");
    let name = daemonset_field("/metadata/name");
    let rollout = format!(
        "kubectl -n {} rollout status daemonset/{}",
        namespace.as_str().expect("namespace"),
        name.as_str().expect("name")
    );
    assert_in_order(
        &netpol,
        &[
            "docker build -t \"${IMAGE}\" .",
            "https://dl.k8s.io/${K8S_VERSION}/kubernetes-test-linux-amd64.tar.gz",
            "kubernetes/test/bin/ginkgo kubernetes/test/bin/e2e.test",
            "kind create cluster --name \"${KIND_CLUSTER_NAME}\" --image \"${KIND_NODE_IMAGE}\"",
            "--config \"${{ matrix.kind-config }}\"",
            "deploy/kind/prepare-cluster.sh \"${KIND_CLUSTER_NAME}\"",
            "deploy/kind/check-no-builtin-enforcement.sh \"${KIND_CLUSTER_NAME}\"",
            "kind load docker-image \"${IMAGE}\" --name \"${KIND_CLUSTER_NAME}\"",
            "kubectl apply -k deploy/overlays/kind",
            &rollout,
            "ginkgo --nodes=25 --focus=\"Netpol\" --skip=\"Feature:SCTPConnectivity\" /usr/local/bin/e2e.test --",
            "--provider=local",
        ],
        WORKFLOW,
    );

    // One netpol job per IP family, each on its own kind configuration.
    let matrix: Vec<(String, String)> = workflow["jobs"]["netpol"]["strategy"]["matrix"]["include"]
        .as_array()
        .unwrap_or_else(|| panic!("{WORKFLOW}: the netpol job has no matrix of IP families"))
        .iter()
        .map(|m| {
            (
                m["kind-config"].as_str().expect("kind-config").to_owned(),
                m["ip-family"].as_str().expect("ip-family").to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = KIND_CONFIGS
        .iter()
        .map(|(f, fam)| (f.to_string(), fam.to_string()))
        .collect();
    assert_eq!(
        matrix, want,
        "{WORKFLOW}: the netpol matrix and deploy/kind's configurations"
    );

    let lab = &workflow["jobs"]["lab"];
    assert_eq!(
        lab["container"]["image"],
        format!("docker.io/library/rust:{}-bookworm", rust_version()).as_str(),
        "{WORKFLOW}: the lab runs in the same Debian + Rust as the Dockerfile"
    );
    assert_eq!(
        lab["container"]["options"], "--privileged",
        "{WORKFLOW}: the lab needs namespaces and bpffs"
    );
    assert_in_order(
        &job_script("lab"),
        &["cargo xtask setup", "cargo xtask conformance"],
        WORKFLOW,
    );

    for path in repository_paths(&text) {
        assert!(
            repo_path(&path).exists(),
            "{WORKFLOW} names {path}, which does not exist"
        );
    }
}

#[test]
fn readme_install_steps_name_existing_files_and_real_flags() {
    let readme = read(&repo_path("deploy/README.md"));

    for path in repository_paths(&readme) {
        assert!(
            repo_path(&path).exists(),
            "deploy/README.md names {path}, which does not exist"
        );
    }

    let tool_flags: BTreeSet<&str> = TOOL_FLAGS.iter().map(|(f, _)| *f).collect();
    for flag in flags_in(&readme) {
        let is_agent_flag = agent::flag(flag.trim_start_matches("--")).is_some();
        assert!(
            is_agent_flag || tool_flags.contains(flag.as_str()),
            "deploy/README.md mentions {flag}, which policy-agent does not accept \
             (if it belongs to another tool, list it in TOOL_FLAGS)"
        );
    }
    let mut rest = readme.as_str();
    while let Some(at) = rest.find("POLICY_AGENT_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        assert!(
            agent::flag_for_env(&name).is_some(),
            "deploy/README.md mentions {name}, which is no environment fallback of the agent"
        );
        rest = &rest[at + name.len()..];
    }

    // The values the README quotes are the manifests' values.
    let image = kind_image();
    assert!(
        readme.contains(&format!("docker build -t {image} .")),
        "README builds {image}"
    );
    assert!(
        readme.contains(&format!("kind load docker-image {image}")),
        "README loads {image}"
    );
    let args = daemonset_field("/spec/template/spec/containers/0/args");
    for arg in args.as_array().expect("args") {
        let arg = arg.as_str().expect("string arg");
        if let Some(addr) = arg.strip_prefix("--http-addr=") {
            assert!(readme.contains(&format!("`{arg}`")), "README quotes {arg}");
            let port = addr.rsplit(':').next().expect("a port");
            assert!(
                readme.contains(&format!("localhost:{port}/readyz")),
                "README probes port {port}"
            );
        }
        if let Some(dir) = arg.strip_prefix("--bpffs-dir=") {
            assert!(
                readme.contains(&format!("sudo rm -rf {dir}\n")),
                "README removes the pins in {dir}"
            );
        }
    }
    let grace = daemonset_field("/spec/template/spec/terminationGracePeriodSeconds");
    let prose = readme.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        prose.contains(&format!("{grace}-second grace period")),
        "README quotes the grace period"
    );

    // Uninstall names the agent's programs and its clsact filter slot as the dataplane defines them.
    for program in [
        policy_common::program_names::FROM_POD,
        policy_common::program_names::TO_POD,
        policy_common::program_names::TO_NETWORK,
    ] {
        assert!(
            readme.contains(&format!("`{program}`")),
            "README does not name program {program}"
        );
    }
    let attach = read(&repo_path("policy-agent/src/dataplane/attach.rs"));
    let priority = attach
        .lines()
        .find_map(|l| l.strip_prefix("const NL_PRIORITY: u16 = "))
        .and_then(|v| v.strip_suffix(';'))
        .expect("NL_PRIORITY in policy-agent/src/dataplane/attach.rs");
    let handle = attach
        .lines()
        .find_map(|l| l.strip_prefix("const NL_HANDLE: TcHandle = TcHandle::new(0, "))
        .and_then(|v| v.strip_suffix(");"))
        .expect("NL_HANDLE in policy-agent/src/dataplane/attach.rs");
    for direction in ["ingress", "egress"] {
        let command =
            format!("tc filter del dev IFACE {direction} pref {priority} handle {handle} bpf");
        assert!(readme.contains(&command), "README lacks `{command}`");
    }

    // kind: the same steps, in the same order, with the same names as the workflow and the scripts.
    let cluster = script_default_cluster(PREPARE);
    assert_in_order(
        &readme,
        &[
            &format!("kind create cluster --name {cluster} --config deploy/kind/cluster.yaml"),
            &format!("{PREPARE} {cluster}"),
            &format!("{CHECK} {cluster}"),
            &format!("kind load docker-image {image} --name {cluster}"),
            "kubectl apply -k deploy/overlays/kind",
            "kubectl -n policy-agent rollout status daemonset/policy-agent",
        ],
        "deploy/README.md (kind)",
    );
    // kind names nodes CLUSTER-control-plane, CLUSTER-worker, CLUSTER-worker2.
    let nodes = [
        format!("{cluster}-control-plane"),
        format!("{cluster}-worker"),
        format!("{cluster}-worker2"),
    ];
    for (at, _) in readme.match_indices("docker exec ") {
        let node = readme[at + "docker exec ".len()..]
            .split_whitespace()
            .next()
            .unwrap_or_default();
        assert!(
            nodes.iter().any(|n| n == node),
            "README runs on node {node}, not one of {nodes:?}"
        );
    }
    assert_in_order(
        &readme,
        &[
            "sudo cp deploy/k3s/config.yaml /etc/rancher/k3s/config.yaml",
            "docker save policy-agent:dev | sudo k3s ctr images import -",
            "sudo k3s kubectl apply -k deploy/overlays/k3s",
        ],
        "deploy/README.md (k3s)",
    );
    assert_in_order(
        &readme,
        &[
            "## Uninstall",
            "set env daemonset/policy-agent POLICY_AGENT_CLEANUP_ON_EXIT=true",
            "rollout status daemonset/policy-agent",
            "kubectl delete -k deploy/overlays/",
        ],
        "deploy/README.md (uninstall)",
    );
}

#[test]
fn the_text_checks_find_what_they_look_for() {
    assert_eq!(
        flags_in("run `x --a-b=1` and --c, not a--d or ---"),
        BTreeSet::from(["--a-b".to_owned(), "--c".to_owned()])
    );
    assert_eq!(
        repository_paths(
            "see `deploy/kind/cluster.yaml`, Dockerfile and (.github/workflows/e2e-kind.yml)."
        ),
        BTreeSet::from([
            "deploy/kind/cluster.yaml".to_owned(),
            "Dockerfile".to_owned(),
            ".github/workflows/e2e-kind.yml".to_owned()
        ])
    );
    assert_eq!(
        rust_str_list(
            "const X: &[&str] = &[\n    \"a\", // \"not this\"\n    \"b\",\n];\n",
            "X"
        ),
        ["a", "b"]
    );
    assert_eq!(rust_str_const("const V: &str = \"0.13.0\";", "V"), "0.13.0");
    assert!(agent::flag("cleanup-on-exit").is_some());
    assert!(agent::flag("cleanup-on-exits").is_none());
    assert_eq!(
        agent::flag_for_env("POLICY_AGENT_UPLINKS").map(|f| f.long),
        Some("uplink".to_owned())
    );
}
