//! The real Kubernetes components the lab's real-API mode runs — etcd, kube-apiserver,
//! kube-controller-manager, kube-proxy and kubectl — built from the pinned Go module in
//! `tests/kube/` into a cache outside the work tree, and the peer enforcer
//! `sigs.k8s.io/kube-network-policies` from its own pinned module in `tests/kube/knp/` (its
//! dependencies are older Kubernetes libraries than v1.34's, so it cannot share the module).
//!
//! One Kubernetes minor for everything: v1.34. It is the newest release whose kubelet still runs
//! on cgroup v1 without an opt-in (the machines this is built on have hybrid cgroup v1 and no
//! systemd), it builds with the Go toolchain installed here, kind ships node images for it, and
//! the agent's `k8s-openapi` feature (`v1_34`) matches it.
//!
//! The nodes of `lab up --kubelet` and `cargo xtask e2e` come from the same module: kubelet,
//! kube-scheduler, the upstream e2e suite (`e2e.test`, a `go test -c` of `k8s.io/kubernetes/test/e2e`)
//! with its runner `ginkgo`, and `agnhost`, the suite's server and client image.
//!
//! `e2e.test` is a test binary (`go test -c k8s.io/kubernetes/test/e2e`): its test-only
//! requirements are in `go.mod` because they were added with `go get -t
//! k8s.io/kubernetes/test/e2e@v1.34.4`; `go mod tidy` would prune them (it follows the tests of
//! the module's own packages only), so after a tidy they are re-added the same way.
//!
//! The cache directory is keyed by a digest of `go.mod` and `go.sum`, so a changed pin builds
//! anew and an unchanged one is found in milliseconds.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{exec, workspace_root};

/// The Kubernetes release the binaries are built from (`k8s.io/kubernetes` in `tests/kube/go.mod`).
pub const KUBERNETES_VERSION: &str = "v1.34.4";

/// One pinned Go module under `tests/kube` and the binaries built from it.
#[derive(Clone, Copy, Debug)]
pub struct Set {
    /// The module's directory under `tests/kube`.
    module: &'static str,
    /// What the cache directory is called (before the digest of `go.mod` and `go.sum`).
    name: &'static str,
    /// Binary name → the Go package it is built from, and how.
    binaries: &'static [(&'static str, &'static str, Build)],
    /// Stamp the Kubernetes release into `k8s.io/component-base/version`.
    stamp: bool,
}

/// How a binary is built from its package.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    /// `go build` of a main package.
    Main,
    /// `go build` with cgo off: a static binary for an image with nothing else in it.
    Static,
    /// `go test -c`: a test package's test binary (the upstream e2e suite).
    Test,
}

/// The control plane and kube-proxy, built by `cargo xtask setup`.
pub const KUBERNETES: Set = Set {
    module: ".",
    name: KUBERNETES_VERSION,
    binaries: &[
        ("etcd", "go.etcd.io/etcd/server/v3", Build::Main),
        (
            "kube-apiserver",
            "k8s.io/kubernetes/cmd/kube-apiserver",
            Build::Main,
        ),
        (
            "kube-controller-manager",
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            Build::Main,
        ),
        (
            "kube-proxy",
            "k8s.io/kubernetes/cmd/kube-proxy",
            Build::Main,
        ),
        ("kubectl", "k8s.io/kubernetes/cmd/kubectl", Build::Main),
    ],
    stamp: true,
};

/// Real nodes and the upstream suite (`lab up --kubelet`, `cargo xtask e2e`), also built by
/// `cargo xtask setup`.
pub const NODE: Set = Set {
    module: ".",
    name: "v1.34.4-node",
    binaries: &[
        (
            "kube-scheduler",
            "k8s.io/kubernetes/cmd/kube-scheduler",
            Build::Main,
        ),
        ("kubelet", "k8s.io/kubernetes/cmd/kubelet", Build::Main),
        (
            "agnhost",
            "k8s.io/kubernetes/test/images/agnhost",
            Build::Static,
        ),
        ("ginkgo", "github.com/onsi/ginkgo/v2/ginkgo", Build::Main),
        ("e2e.test", "k8s.io/kubernetes/test/e2e", Build::Test),
    ],
    stamp: true,
};

/// The reference NetworkPolicy implementation (kindnet embeds it), unmodified, as a peer; built
/// when a lab first asks for it (`--enforcer kube-network-policies`).
pub const PEER: Set = Set {
    module: "knp",
    name: "kube-network-policies-v0.8.0",
    binaries: &[(
        "kube-network-policies",
        "sigs.k8s.io/kube-network-policies/cmd",
        Build::Main,
    )],
    stamp: false,
};

/// Where the built binaries are.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub dir: PathBuf,
}

impl Binaries {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The Kubernetes binaries of the current pin if they are built (no build).
    pub fn find() -> Result<Binaries> {
        KUBERNETES.find()
    }
}

impl Set {
    /// The binaries of the current pin if they are built (no build).
    pub fn find(&self) -> Result<Binaries> {
        let dir = self.cache_dir()?;
        if self
            .binaries
            .iter()
            .all(|(name, _, _)| dir.join(name).is_file())
        {
            Ok(Binaries { dir })
        } else {
            bail!(
                "{} is not built in {}; run `cargo xtask setup`",
                self.name,
                dir.display()
            )
        }
    }

    fn module_dir(&self) -> PathBuf {
        workspace_root()
            .join("tests")
            .join("kube")
            .join(self.module)
    }

    /// `$POLICY_KUBE_CACHE` or `/var/cache/policy-agent/kube`, then a directory per pin.
    fn cache_dir(&self) -> Result<PathBuf> {
        let base = std::env::var_os("POLICY_KUBE_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/policy-agent/kube"));
        let mut key = Vec::new();
        for f in ["go.mod", "go.sum"] {
            let p = self.module_dir().join(f);
            key.extend(std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?);
        }
        let digest = policy_common::digest::object_term("", "", "", &String::from_utf8_lossy(&key));
        Ok(base.join(format!("{}-{digest:016x}", self.name)))
    }

    /// Builds the binaries unless the cache has them; prints how long a build took.
    pub fn ensure(&self) -> Result<Binaries> {
        if let Ok(b) = self.find() {
            return Ok(b);
        }
        let dir = self.cache_dir()?;
        let staging = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("creating {}", staging.display()))?;
        let started = Instant::now();
        let names: Vec<&str> = self.binaries.iter().map(|(n, _, _)| *n).collect();
        eprintln!(
            "setup: building {} ({}) from tests/kube/{} into {}",
            self.name,
            names.join(", "),
            self.module,
            dir.display()
        );
        for &(name, package, build) in self.binaries {
            let mut cmd = Command::new(go()?);
            cmd.current_dir(self.module_dir())
                .env("GOTOOLCHAIN", "local")
                .env("GOFLAGS", "-mod=readonly -buildvcs=false")
                .args(match build {
                    Build::Main | Build::Static => &["build", "-trimpath"][..],
                    Build::Test => &["test", "-c", "-trimpath"][..],
                });
            if build == Build::Static {
                cmd.env("CGO_ENABLED", "0");
            }
            cmd.arg(if self.stamp {
                ldflags()
            } else {
                "-ldflags=-s -w".into()
            })
            .arg("-o")
            .arg(staging.join(name))
            .arg(package);
            exec(&mut cmd).with_context(|| format!("building {name} from {package}"))?;
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::rename(&staging, &dir)?;
        eprintln!(
            "setup: {} built in {:.0} s",
            self.name,
            started.elapsed().as_secs_f64()
        );
        self.find()
    }
}

/// The `go` command: on `PATH`, or the toolchain's usual place.
fn go() -> Result<PathBuf> {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("go");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let fallback = Path::new("/usr/local/go/bin/go");
    if fallback.is_file() {
        return Ok(fallback.to_path_buf());
    }
    bail!("no Go toolchain found (PATH or /usr/local/go/bin/go); it builds the Kubernetes binaries")
}

/// Strips debug data and stamps the release into `k8s.io/component-base/version`, as the
/// Kubernetes release build does, so `kubectl version` and `/version` name it.
fn ldflags() -> String {
    let v = KUBERNETES_VERSION.trim_start_matches('v');
    let mut parts = v.split('.');
    let (major, minor) = (parts.next().unwrap_or("1"), parts.next().unwrap_or("0"));
    let pkg = "k8s.io/component-base/version";
    format!(
        "-ldflags=-s -w -X {pkg}.gitVersion={KUBERNETES_VERSION} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} -X {pkg}.gitTreeState=clean"
    )
}

/// Builds the Kubernetes binaries unless the cache has them.
pub fn ensure() -> Result<Binaries> {
    KUBERNETES.ensure()
}

/// Builds the node binaries and the e2e suite unless the cache has them.
pub fn ensure_node() -> Result<Binaries> {
    NODE.ensure()
}
