//! Offline validation of the Kubernetes manifests under deploy/ (base and overlays), as users install them:
//! every object is a lossless Kubernetes 1.34 object, the DaemonSet passes the agent only flags it accepts and
//! agrees with it on ports, probes and mounts, it runs with capabilities rather than privileged, and RBAC grants
//! exactly the read access the agent's watchers need. kubectl (the one `cargo xtask setup` builds) renders the same
//! objects and accepts them in a client-side dry run.

mod deploy_support;

use std::collections::BTreeSet;

use deploy_support::{
    KUSTOMIZATIONS, OVERLAYS, agent, kubectl, kustomize, object_ref, only, read, render, repo_path,
    typed::{self, Typed},
    yaml_file,
};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, PodSpec, Probe},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::Value;

/// The kinds the agent watches, as (apiGroup, resource), with get/list/watch each.
use policy_agent::sources::kubernetes::WATCHED;
const WATCH_VERBS: &[&str] = &["get", "list", "watch"];

/// The value the DaemonSet's downward-API env vars get in these tests.
const NODE: &str = "kind-worker2";

fn daemonset(objects: &[Value]) -> DaemonSet {
    typed::lossless(only(objects, "DaemonSet")).unwrap_or_else(|e| panic!("{e}"))
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("DaemonSet has a pod template spec")
}

fn agent_container(ds: &DaemonSet) -> &Container {
    let containers = &pod_spec(ds).containers;
    assert_eq!(
        containers.len(),
        1,
        "the agent pod runs one container, found {}",
        containers.len()
    );
    &containers[0]
}

fn parse_agent(container: &Container) -> policy_agent::cli::Args {
    agent::parse_container(container, |field| match field {
        "spec.nodeName" => NODE.to_owned(),
        other => panic!("unexpected downward API field {other}"),
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_object_is_a_lossless_kubernetes_1_33_object() {
    for dir in KUSTOMIZATIONS {
        let objects = render(dir);
        assert!(!objects.is_empty(), "{dir} renders nothing");
        let mut seen = BTreeSet::new();
        for object in &objects {
            typed::parse(object).unwrap_or_else(|e| panic!("{dir}: {e}"));
            assert!(
                seen.insert(object_ref(object)),
                "{dir}: {} appears twice",
                object_ref(object)
            );
        }
        let kinds: BTreeSet<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            BTreeSet::from([
                "Namespace",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "DaemonSet"
            ]),
            "{dir}: unexpected set of kinds"
        );
    }
}

#[test]
fn the_lossless_check_rejects_misspelt_and_misplaced_fields() {
    let objects = render("deploy/base");
    let mut object = only(&objects, "DaemonSet").clone();
    let mount = object
        .pointer_mut("/spec/template/spec/containers/0/volumeMounts/0")
        .expect("a volume mount");
    let propagation = mount["mountPropagation"].take();
    mount["mountPropogation"] = propagation;
    mount
        .as_object_mut()
        .expect("mapping")
        .remove("mountPropagation");
    let error = match typed::parse(&object) {
        Ok(_) => panic!("a misspelt mountPropagation was accepted"),
        Err(e) => e,
    };
    assert!(error.contains("mountPropogation"), "{error}");

    let mut object = only(&objects, "DaemonSet").clone();
    object["spec"]["hostNetwork"] = Value::Bool(true);
    assert!(
        typed::parse(&object).is_err(),
        "hostNetwork on the DaemonSet spec instead of the pod spec was accepted"
    );
}

#[test]
fn every_manifest_file_belongs_to_a_kustomization() {
    let mut referenced = BTreeSet::new();
    let mut on_disk = BTreeSet::new();
    for dir in KUSTOMIZATIONS {
        let path = repo_path(dir);
        let kustomization = &yaml_file(&path.join("kustomization.yaml"))[0];
        for key in ["resources", "patches"] {
            for entry in kustomization[key].as_array().into_iter().flatten() {
                let file = entry.as_str().or(entry["path"].as_str()).expect("a path");
                if path.join(file).is_file() {
                    referenced.insert(path.join(file).canonicalize().expect("canonical path"));
                }
            }
        }
        for entry in std::fs::read_dir(&path)
            .expect("reading a kustomization dir")
            .flatten()
        {
            let file = entry.path();
            let is_yaml = file.extension().is_some_and(|e| e == "yaml" || e == "yml");
            if is_yaml && file.file_name().is_some_and(|n| n != "kustomization.yaml") {
                on_disk.insert(file.canonicalize().expect("canonical path"));
            }
        }
    }
    let orphans: Vec<_> = on_disk.difference(&referenced).collect();
    assert!(
        orphans.is_empty(),
        "manifests no kustomization uses: {orphans:?}"
    );
}

#[test]
fn the_test_renderer_agrees_with_kubectl_kustomize() {
    eprintln!("using {}", kubectl::find());
    for dir in KUSTOMIZATIONS {
        let output = std::process::Command::new(kubectl::path())
            .args(["kustomize"])
            .arg(repo_path(dir))
            .output()
            .expect("running kubectl kustomize");
        assert!(
            output.status.success(),
            "kubectl kustomize {dir}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let theirs = deploy_support::yaml_documents(
            &String::from_utf8_lossy(&output.stdout),
            &repo_path(dir),
        )
        .expect("kubectl kustomize prints YAML");
        let ours = kustomize::build(&repo_path(dir)).expect("rendering");
        assert_eq!(
            ours.len(),
            theirs.len(),
            "{dir}: object count differs from kubectl kustomize"
        );
        for object in &ours {
            let same = theirs.iter().find(|t| object_ref(t) == object_ref(object));
            let same = same
                .unwrap_or_else(|| panic!("{dir}: kubectl kustomize lacks {}", object_ref(object)));
            let differences = deploy_support::json_differences(object, same);
            assert!(
                differences.is_empty(),
                "{dir}: {} renders differently with kubectl kustomize:\n  {}",
                object_ref(object),
                differences.join("\n  ")
            );
        }
    }
}

#[test]
fn kubectl_client_dry_run_accepts_every_overlay() {
    eprintln!("using {}", kubectl::find());
    let stub = kubectl::DiscoveryStub::start();
    let cache = tempdir("kubectl-cache");
    for dir in KUSTOMIZATIONS {
        let path = repo_path(dir);
        let output = stub.kubectl(
            &cache,
            &[
                "apply",
                "--dry-run=client",
                "--validate=false",
                "-o",
                "name",
                "-k",
                path.to_str().expect("utf-8 path"),
            ],
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "kubectl apply --dry-run=client -k {dir} failed:\n{}{}",
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
        let applied: BTreeSet<String> = stdout
            .lines()
            .map(|l| {
                l.split(['/', '.']).next().unwrap_or(l).to_owned()
                    + "/"
                    + l.rsplit('/').next().unwrap_or("")
            })
            .collect();
        let expected: BTreeSet<String> = render(dir)
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap_or_default().to_lowercase(),
                    o["metadata"]["name"].as_str().unwrap_or_default()
                )
            })
            .collect();
        assert_eq!(
            applied, expected,
            "kubectl applied a different set of objects for {dir}"
        );
    }
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn kubectl_dry_run_catches_a_broken_manifest() {
    eprintln!("using {}", kubectl::find());
    let stub = kubectl::DiscoveryStub::start();
    let dir = tempdir("kubectl-negative");
    let broken = dir.join("broken.yaml");
    // A namespaced kind kubectl cannot map (typo in the kind) must be refused, not ignored.
    std::fs::write(
        &broken,
        "apiVersion: apps/v1\nkind: DaemonSett\nmetadata:\n  name: x\n  namespace: policy-agent\n",
    )
    .expect("writing a broken manifest");
    let output = stub.kubectl(
        &dir.join("cache"),
        &[
            "apply",
            "--dry-run=client",
            "--validate=false",
            "-f",
            broken.to_str().expect("utf-8"),
        ],
    );
    assert!(!output.status.success(), "kubectl accepted kind DaemonSett");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(purpose: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "policy-tests-deploy-{purpose}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("creating a temp dir");
    dir
}

#[test]
fn daemonset_passes_only_flags_and_env_the_agent_accepts() {
    for dir in KUSTOMIZATIONS {
        let ds = daemonset(&render(dir));
        let args = parse_agent(agent_container(&ds));
        assert_eq!(
            args.node_name, NODE,
            "{dir}: NODE_NAME does not reach --node-name"
        );
        assert!(
            args.manifest_dir.is_none(),
            "{dir}: the DaemonSet must use the Kubernetes source"
        );
        assert!(
            args.kubeconfig.is_none(),
            "{dir}: the DaemonSet must use the in-cluster config"
        );
        assert!(
            !args.cleanup_on_exit,
            "{dir}: enforcement must stay in place across agent restarts"
        );
        let node_name = agent_container(&ds)
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "NODE_NAME")
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        assert_eq!(
            node_name,
            Some("spec.nodeName"),
            "{dir}: NODE_NAME must come from the downward API"
        );
    }
}

#[test]
fn the_flag_check_rejects_what_the_agent_would_reject() {
    let ds = daemonset(&render("deploy/base"));
    let container = agent_container(&ds);

    let mut unknown = container.clone();
    unknown
        .args
        .get_or_insert_with(Vec::new)
        .push("--no-such-flag=1".into());
    let error =
        agent::parse_container(&unknown, |_| NODE.into()).expect_err("unknown flag accepted");
    assert!(error.contains("no-such-flag"), "{error}");

    let mut no_node = container.clone();
    no_node.env = None;
    agent::parse_container(&no_node, |_| NODE.into())
        .expect_err("a DaemonSet without NODE_NAME was accepted");

    let mut bad_mask = container.clone();
    bad_mask
        .args
        .get_or_insert_with(Vec::new)
        .push("--mark-mask=0x4000ffff".into());
    agent::parse_container(&bad_mask, |_| NODE.into())
        .expect_err("a mark mask overlapping kube-proxy's bits was accepted");

    // The test machine's environment must not stand in for the manifest's.
    let mut unknown_env = container.clone();
    unknown_env
        .env
        .get_or_insert_with(Vec::new)
        .push(k8s_openapi::api::core::v1::EnvVar {
            name: "POLICY_AGENT_NO_SUCH_SETTING".into(),
            value: Some("1".into()),
            value_from: None,
        });
    agent::parse_container(&unknown_env, |_| NODE.into())
        .expect_err("an env var no flag reads was accepted");
}

/// The container port a probe (or anything naming a port) refers to.
fn port_number(container: &Container, port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("no container port named {name}"))
                .container_port
        }
    }
}

fn http_probe<'a>(
    probe: Option<&'a Probe>,
    what: &str,
) -> &'a k8s_openapi::api::core::v1::HTTPGetAction {
    probe
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("the agent container needs an HTTP {what} probe"))
}

#[test]
fn ports_and_probes_match_the_agents_http_server() {
    for dir in KUSTOMIZATIONS {
        let ds = daemonset(&render(dir));
        let container = agent_container(&ds);
        let args = parse_agent(container);
        let ports: Vec<_> = container.ports.iter().flatten().collect();
        assert_eq!(
            ports.len(),
            1,
            "{dir}: one port, the agent's HTTP server (metrics, health)"
        );
        let port = ports[0];
        assert_eq!(
            port.container_port,
            i32::from(args.http_addr.port()),
            "{dir}: containerPort differs from --http-addr {}",
            args.http_addr
        );
        assert_eq!(port.protocol.as_deref().unwrap_or("TCP"), "TCP");
        assert!(
            port.host_port.is_none_or(|h| h == port.container_port),
            "{dir}: with hostNetwork hostPort must equal containerPort"
        );
        assert!(
            args.http_addr.ip().is_unspecified(),
            "{dir}: with hostNetwork the kubelet probes the node's address; --http-addr {} would not answer",
            args.http_addr
        );
        let annotations = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .expect("pod annotations");
        assert_eq!(
            annotations.get("prometheus.io/port").map(String::as_str),
            Some(port.container_port.to_string().as_str()),
            "{dir}: prometheus.io/port annotation"
        );

        for (probe, what, path) in [
            (container.readiness_probe.as_ref(), "readiness", "/readyz"),
            (container.liveness_probe.as_ref(), "liveness", "/healthz"),
        ] {
            let get = http_probe(probe, what);
            assert_eq!(get.path.as_deref(), Some(path), "{dir}: {what} probe path");
            assert_eq!(
                port_number(container, &get.port),
                i32::from(args.http_addr.port()),
                "{dir}: {what} probe port differs from --http-addr"
            );
            assert!(
                get.host.is_none(),
                "{dir}: {what} probe must target the pod (node) address"
            );
            assert_eq!(
                get.scheme.as_deref().unwrap_or("HTTP"),
                "HTTP",
                "{dir}: {what} probe scheme"
            );
        }
    }
}

#[test]
fn mounts_give_the_agent_bpffs_pod_network_namespaces_its_control_socket_and_the_cni_directories() {
    for dir in KUSTOMIZATIONS {
        let ds = daemonset(&render(dir));
        let spec = pod_spec(&ds);
        let container = agent_container(&ds);
        let args = parse_agent(container);
        let volume = |name: &str| {
            spec.volumes
                .iter()
                .flatten()
                .find(|v| v.name == name)
                .unwrap_or_else(|| panic!("{dir}: volume {name} is mounted but not declared"))
        };
        let mounts: Vec<_> = container.volume_mounts.iter().flatten().collect();
        for mount in &mounts {
            assert_ne!(
                mount.mount_propagation.as_deref(),
                Some("Bidirectional"),
                "{dir}: Bidirectional propagation needs a privileged container"
            );
            volume(&mount.name);
        }

        // Pins: --bpffs-dir lies strictly inside the node's /sys/fs/bpf, mounted writable, host-to-container.
        let bpffs = mounts
            .iter()
            .filter(|m| args.bpffs_dir.starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| {
                panic!(
                    "{dir}: no mount holds --bpffs-dir {}",
                    args.bpffs_dir.display()
                )
            });
        assert_ne!(
            args.bpffs_dir.as_path(),
            std::path::Path::new(&bpffs.mount_path),
            "{dir}: pins go in a directory of their own inside bpffs"
        );
        let host = volume(&bpffs.name)
            .host_path
            .as_ref()
            .expect("bpffs is a hostPath");
        assert_eq!(host.path, "/sys/fs/bpf", "{dir}: bpffs volume");
        assert_eq!(
            host.type_.as_deref(),
            Some("Directory"),
            "{dir}: never create /sys/fs/bpf"
        );
        assert_eq!(bpffs.mount_path, "/sys/fs/bpf");
        assert_ne!(
            bpffs.read_only,
            Some(true),
            "{dir}: the agent pins into bpffs"
        );
        assert_eq!(
            bpffs.mount_propagation.as_deref(),
            Some("HostToContainer"),
            "{dir}: bpffs propagation"
        );

        // Pod network namespaces, as containerd pins them, read-only and following new ones.
        let netns = mounts
            .iter()
            .find(|m| m.mount_path == "/var/run/netns")
            .unwrap_or_else(|| panic!("{dir}: /var/run/netns is not mounted"));
        let host = volume(&netns.name)
            .host_path
            .as_ref()
            .expect("netns is a hostPath");
        assert_eq!(host.path, "/var/run/netns");
        assert_eq!(
            netns.read_only,
            Some(true),
            "{dir}: the agent only opens namespaces"
        );
        assert_eq!(
            netns.mount_propagation.as_deref(),
            Some("HostToContainer"),
            "{dir}: netns propagation"
        );

        // The control socket's directory: writable although the root filesystem is read-only,
        // private to the pod (an emptyDir, not a host path other pods could share).
        let socket_dir = args
            .control_socket
            .parent()
            .expect("--control-socket has a directory");
        let control = mounts
            .iter()
            .find(|m| std::path::Path::new(&m.mount_path) == socket_dir)
            .unwrap_or_else(|| {
                panic!(
                    "{dir}: no mount at {} for --control-socket (the root filesystem is read-only)",
                    socket_dir.display()
                )
            });
        assert_ne!(
            control.read_only,
            Some(true),
            "{dir}: the agent binds its control socket"
        );
        assert!(
            volume(&control.name).empty_dir.is_some(),
            "{dir}: the control socket's directory is an emptyDir"
        );

        // The chained CNI plugin: its socket's directory is the node's, at the same path (the
        // chain entry names it and the runtime runs the plugin on the node); the CNI directories
        // are the node's, writable, where this flavour's runtime reads them.
        let (want_conf, want_bin) = if dir.ends_with("k3s") {
            (
                "/var/lib/rancher/k3s/agent/etc/cni/net.d",
                "/var/lib/rancher/k3s/data/cni",
            )
        } else {
            ("/etc/cni/net.d", "/opt/cni/bin")
        };
        let host_of = |path: &std::path::Path, what: &str| {
            let m = mounts
                .iter()
                .find(|m| std::path::Path::new(&m.mount_path) == path)
                .unwrap_or_else(|| panic!("{dir}: no mount at {} for {what}", path.display()));
            assert_ne!(m.read_only, Some(true), "{dir}: {what} is written");
            volume(&m.name)
                .host_path
                .as_ref()
                .unwrap_or_else(|| panic!("{dir}: {what} is not a hostPath"))
                .path
                .clone()
        };
        let cni_socket = args.cni_socket.as_ref().expect("--cni-socket is set");
        let socket_dir = cni_socket.parent().expect("--cni-socket has a directory");
        assert_eq!(
            host_of(socket_dir, "--cni-socket"),
            socket_dir.display().to_string(),
            "{dir}: the CNI socket is at the node's path"
        );
        let conf = args.cni_conf_dir.as_ref().expect("--cni-conf-dir is set");
        assert_eq!(host_of(conf, "--cni-conf-dir"), want_conf, "{dir}");
        let bin = args.cni_bin_dir.as_ref().expect("--cni-bin-dir is set");
        assert_eq!(host_of(bin, "--cni-bin-dir"), want_bin, "{dir}");

        assert_eq!(
            spec.host_pid, None,
            "{dir}: no hostPID (namespaces come from /var/run/netns)"
        );
        assert!(
            !spec
                .volumes
                .iter()
                .flatten()
                .any(|v| v.host_path.as_ref().is_some_and(|h| h.path == "/proc")),
            "{dir}: no host /proc"
        );
    }
}

#[test]
fn the_agent_runs_with_capabilities_not_privileged() {
    let source = read(&repo_path("deploy/base/daemonset.yaml"));
    for dir in KUSTOMIZATIONS {
        let ds = daemonset(&render(dir));
        let container = agent_container(&ds);
        let context = container
            .security_context
            .as_ref()
            .expect("a securityContext");
        assert_ne!(
            context.privileged,
            Some(true),
            "{dir}: must not be privileged"
        );
        let capabilities = context.capabilities.as_ref().expect("capabilities");
        assert_eq!(
            capabilities.drop.as_deref(),
            Some(&["ALL".to_owned()][..]),
            "{dir}: drop ALL first"
        );
        let added: BTreeSet<&str> = capabilities
            .add
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        assert_eq!(
            added,
            BTreeSet::from(["BPF", "NET_ADMIN", "SYS_ADMIN"]),
            "{dir}: added capabilities"
        );
        // API validation (ValidateSecurityContext): allowPrivilegeEscalation=false is refused with SYS_ADMIN.
        assert_ne!(
            context.allow_privilege_escalation,
            Some(false),
            "{dir}: the API server rejects allowPrivilegeEscalation: false together with SYS_ADMIN"
        );
        assert_eq!(
            context.read_only_root_filesystem,
            Some(true),
            "{dir}: read-only root filesystem"
        );
        assert_eq!(
            context.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
            Some("RuntimeDefault"),
            "{dir}: keep the runtime's seccomp profile"
        );
        assert_eq!(
            context.app_armor_profile.as_ref().map(|p| p.type_.as_str()),
            Some("Unconfined"),
            "{dir}: the default AppArmor profile forbids writing under /sys/fs/bpf"
        );
        // Each added capability is explained where it is granted.
        for capability in &added {
            assert!(
                source
                    .lines()
                    .any(|l| l.trim_start().starts_with(&format!("# {capability}:"))),
                "deploy/base/daemonset.yaml: no `# {capability}: why` comment"
            );
        }
    }
}

#[test]
fn the_agent_runs_on_every_node_in_the_nodes_network_namespace() {
    for dir in KUSTOMIZATIONS {
        let ds = daemonset(&render(dir));
        let spec = pod_spec(&ds);
        assert_eq!(spec.host_network, Some(true), "{dir}: hostNetwork");
        assert_eq!(
            spec.dns_policy.as_deref(),
            Some("ClusterFirstWithHostNet"),
            "{dir}: dnsPolicy"
        );
        let tolerates_everything = spec.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        });
        assert!(
            tolerates_everything,
            "{dir}: needs a toleration {{operator: Exists}} for every taint"
        );
        assert_eq!(
            spec.priority_class_name.as_deref(),
            Some("system-node-critical"),
            "{dir}: must not be evicted before workloads"
        );
        let selector = ds
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.as_ref())
            .expect("selector");
        let labels = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.as_ref())
            .expect("pod labels");
        for (key, value) in selector {
            assert_eq!(
                labels.get(key),
                Some(value),
                "{dir}: pod template does not match the selector"
            );
        }

        let resources = agent_container(&ds).resources.as_ref().expect("resources");
        for (what, list) in [
            ("requests", &resources.requests),
            ("limits", &resources.limits),
        ] {
            let list = list
                .as_ref()
                .unwrap_or_else(|| panic!("{dir}: resource {what}"));
            for resource in ["cpu", "memory"] {
                assert!(
                    list.contains_key(resource),
                    "{dir}: {what} lacks {resource}"
                );
            }
        }
    }
}

#[test]
fn rbac_grants_read_access_to_exactly_the_watched_kinds() {
    let expected: BTreeSet<(String, String, String)> = WATCHED
        .iter()
        .flat_map(|(group, resource)| {
            WATCH_VERBS
                .iter()
                .map(move |verb| (group.to_string(), resource.to_string(), verb.to_string()))
        })
        .collect();
    for dir in KUSTOMIZATIONS {
        let objects = render(dir);
        let role: ClusterRole =
            typed::lossless(only(&objects, "ClusterRole")).expect("ClusterRole");
        let mut granted = BTreeSet::new();
        for rule in role.rules.iter().flatten() {
            assert!(
                rule.resource_names.is_none(),
                "{dir}: unexpected resourceNames"
            );
            assert!(
                rule.non_resource_urls.is_none(),
                "{dir}: unexpected nonResourceURLs"
            );
            for group in rule.api_groups.iter().flatten() {
                for resource in rule.resources.iter().flatten() {
                    for verb in &rule.verbs {
                        assert!(
                            granted.insert((group.clone(), resource.clone(), verb.clone())),
                            "{dir}: {group}/{resource} {verb} granted twice"
                        );
                    }
                }
            }
        }
        assert_eq!(
            granted, expected,
            "{dir}: ClusterRole rules differ from the watched kinds"
        );

        let binding: ClusterRoleBinding =
            typed::lossless(only(&objects, "ClusterRoleBinding")).expect("ClusterRoleBinding");
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
        let ds = daemonset(&objects);
        let account = pod_spec(&ds)
            .service_account_name
            .as_deref()
            .expect("serviceAccountName");
        let namespace = ds
            .metadata
            .namespace
            .as_deref()
            .expect("DaemonSet namespace");
        let subjects = binding.subjects.as_deref().unwrap_or_default();
        assert_eq!(
            subjects.len(),
            1,
            "{dir}: bind the agent's ServiceAccount only"
        );
        assert_eq!(subjects[0].kind, "ServiceAccount");
        assert_eq!(subjects[0].name, account);
        assert_eq!(subjects[0].namespace.as_deref(), Some(namespace));
        let sa = only(&objects, "ServiceAccount");
        assert_eq!(sa["metadata"]["name"], account);
        assert_eq!(sa["metadata"]["namespace"], namespace);
        assert_eq!(only(&objects, "Namespace")["metadata"]["name"], namespace);
        for object in &objects {
            match typed::parse(object).expect("typed") {
                Typed::Namespace(_) | Typed::ClusterRole(_) | Typed::ClusterRoleBinding(_) => {}
                Typed::ServiceAccount(_) | Typed::DaemonSet(_) => assert_eq!(
                    object["metadata"]["namespace"],
                    namespace,
                    "{dir}: {} outside the agent's namespace",
                    object_ref(object)
                ),
            }
        }
    }
}

#[test]
fn the_namespace_admits_the_agent_under_pod_security() {
    for dir in KUSTOMIZATIONS {
        let objects = render(dir);
        assert_eq!(
            only(&objects, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
            "privileged",
            "{dir}: hostNetwork, hostPath and added capabilities need the privileged Pod Security level"
        );
    }
}

#[test]
fn overlays_fit_how_each_cluster_gets_the_image() {
    for dir in OVERLAYS {
        let ds = daemonset(&render(dir));
        let container = agent_container(&ds);
        let image = container.image.as_deref().expect("image");
        assert!(
            image
                .rsplit_once(':')
                .is_some_and(|(_, tag)| tag != "latest" && !tag.contains('/')),
            "{dir}: image {image} needs an explicit tag other than latest"
        );
        let policy = container.image_pull_policy.as_deref();
        match *dir {
            // `kind load docker-image` puts the image on the nodes; nothing is pulled.
            "deploy/overlays/kind" => {
                assert_eq!(policy, Some("Never"), "{dir}: imagePullPolicy");
                let args = parse_agent(container);
                assert!(
                    args.flow_log,
                    "{dir}: e2e runs log drops for `kind export logs`"
                );
            }
            "deploy/overlays/k3s" => {
                assert_eq!(policy, Some("IfNotPresent"), "{dir}: imagePullPolicy");
                // kube-router (k3s's NetworkPolicy controller, or the rules it leaves behind) marks
                // 0x10000 and 0x20000, which the default mask covers.
                let args = parse_agent(container);
                assert_eq!(
                    args.mark_mask & 0x3_0000,
                    0,
                    "{dir}: --mark-mask {:#x} overlaps kube-router's marks",
                    args.mark_mask
                );
            }
            other => panic!("no expectation for overlay {other}"),
        }
    }
}
