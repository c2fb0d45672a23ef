//! kubectl, as `cargo xtask setup` builds it. `kubectl apply --dry-run=client` still asks a server for API discovery (to map
//! kinds to resources and learn which are namespaced), so it cannot run against nothing; [`DiscoveryStub`] is a
//! local HTTP server that answers discovery for the kinds deploy/ ships, as a Kubernetes 1.34 API server lists
//! them, and "404 Not Found" for every object, which is what a dry-run apply of new objects asks.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Command, Output},
    thread,
};

use serde_json::{Value, json};

/// The kubectl these checks run: `$POLICY_KUBECTL` (`cargo xtask test` points it at the kubectl that
/// `cargo xtask setup` builds, of the Kubernetes version the project pins), else `kubectl` on PATH.
pub fn path() -> std::path::PathBuf {
    std::env::var_os("POLICY_KUBECTL")
        .map(Into::into)
        .unwrap_or_else(|| "kubectl".into())
}

/// kubectl's version line. Panics when there is no kubectl: the checks need it.
pub fn find() -> String {
    let kubectl = path();
    let output = Command::new(&kubectl)
        .args(["version", "--client"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "kubectl ({}) is required: {e}; run `cargo xtask setup` (it builds kubectl) and \
                 `cargo xtask test`, or set POLICY_KUBECTL",
                kubectl.display()
            )
        });
    assert!(
        output.status.success(),
        "{} version --client failed: {output:?}",
        kubectl.display()
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or("kubectl")
        .to_owned()
}

/// (group/version, resource, kind, namespaced) served by the stub.
const RESOURCES: &[(&str, &str, &str, bool)] = &[
    ("v1", "namespaces", "Namespace", false),
    ("v1", "serviceaccounts", "ServiceAccount", true),
    ("v1", "services", "Service", true),
    ("v1", "pods", "Pod", true),
    ("apps/v1", "daemonsets", "DaemonSet", true),
    (
        "rbac.authorization.k8s.io/v1",
        "clusterroles",
        "ClusterRole",
        false,
    ),
    (
        "rbac.authorization.k8s.io/v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        false,
    ),
    ("rbac.authorization.k8s.io/v1", "roles", "Role", true),
    (
        "rbac.authorization.k8s.io/v1",
        "rolebindings",
        "RoleBinding",
        true,
    ),
    (
        "networking.k8s.io/v1",
        "networkpolicies",
        "NetworkPolicy",
        true,
    ),
];

/// A discovery-only API server on 127.0.0.1 for kubectl's client-side dry runs. It lives until the test process
/// ends.
pub struct DiscoveryStub {
    pub url: String,
}

impl DiscoveryStub {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the discovery stub");
        let url = format!("http://{}", listener.local_addr().expect("stub address"));
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                thread::spawn(move || serve(stream));
            }
        });
        Self { url }
    }

    /// Runs kubectl against the stub, with an empty kubeconfig and a private discovery cache.
    pub fn kubectl(&self, cache_dir: &Path, args: &[&str]) -> Output {
        Command::new(path())
            .arg("--kubeconfig=/dev/null")
            .arg(format!("--server={}", self.url))
            .arg(format!("--cache-dir={}", cache_dir.display()))
            .args(args)
            .output()
            .expect("running kubectl")
    }
}

fn serve(stream: TcpStream) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        // Headers, up to the blank line; GET requests carry no body.
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" || header == "\n" {
                break;
            }
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .split('?')
            .next()
            .unwrap_or("/");
        let (status, body) = match discovery(path) {
            Some(body) => ("200 OK", body),
            None => ("404 Not Found", not_found(path)),
        };
        let body = body.to_string();
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn discovery(path: &str) -> Option<Value> {
    if path == "/api" {
        return Some(json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}));
    }
    let group_versions = || {
        let mut seen: Vec<&str> = RESOURCES
            .iter()
            .map(|r| r.0)
            .filter(|gv| gv.contains('/'))
            .collect();
        seen.dedup();
        seen
    };
    if path == "/apis" {
        let groups: Vec<Value> = group_versions()
            .into_iter()
            .map(|gv| {
                let (group, version) = gv.split_once('/').unwrap_or((gv, ""));
                let entry = json!({"groupVersion": gv, "version": version});
                json!({"name": group, "versions": [entry], "preferredVersion": entry})
            })
            .collect();
        return Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}));
    }
    let group_version = if path == "/api/v1" {
        "v1"
    } else {
        path.strip_prefix("/apis/")
            .filter(|gv| gv.matches('/').count() == 1)?
    };
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.0 == group_version)
        .map(|(_, name, kind, namespaced)| {
            json!({"name": name, "singularName": kind.to_lowercase(), "namespaced": namespaced, "kind": kind,
                   "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
        })
        .collect();
    (!resources.is_empty()).then(|| {
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
    })
}

fn not_found(path: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
           "message": format!("{path} not found")})
}
