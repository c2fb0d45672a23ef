//! The plugin side of `policy-agent-cni`: the CNI protocol (environment, configuration on stdin,
//! result or error on stdout) and one request per invocation to the agent's socket.
//!
//! Commands (CNI spec 1.1): ADD and CHECK ask the agent to enforce the pod and print the previous
//! result unchanged; DEL tells the agent the sandbox is gone and succeeds even when the agent is
//! not running (DEL must be idempotent; the agent also forgets a pod when the API deletes it);
//! VERSION lists the supported versions; STATUS reports whether the agent answers; GC succeeds.
//!
//! The configuration entry the agent appends to the node's list ([`super::chain`]):
//!
//! ```json
//! {"type": "policy-agent-cni", "socket": "/run/policy-agent-cni/cni.sock", "timeoutSeconds": 10}
//! ```

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ATTACH_PATH, AttachReply, AttachRequest, DEFAULT_SOCKET, DEFAULT_TIMEOUT_SECONDS, DETACH_PATH,
    DetachRequest, STATUS_PATH,
};
use crate::control::{self, ControlError};

/// CNI versions this plugin reads and writes (results are passed through unchanged).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// What the runtime passes in the environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Invocation {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS`, `K=V;K=V`.
    pub args: BTreeMap<String, String>,
}

impl Invocation {
    /// Reads `CNI_*` through `var`.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Self {
        let args = var("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self {
            command: var("CNI_COMMAND").unwrap_or_default(),
            container_id: var("CNI_CONTAINERID").unwrap_or_default(),
            netns: var("CNI_NETNS").unwrap_or_default(),
            ifname: var("CNI_IFNAME").unwrap_or_default(),
            args,
        }
    }

    fn arg(&self, key: &str) -> Result<&str, PluginError> {
        self.args
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| PluginError::Environment {
                what: format!("CNI_ARGS has no {key} (is the runtime a Kubernetes one?)"),
            })
    }
}

/// The plugin's entry in the configuration list, with what the runtime adds to it.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    #[serde(default)]
    cni_version: String,
    #[serde(default)]
    name: String,
    /// The agent's socket (a path on the node).
    socket: Option<PathBuf>,
    /// How long ADD waits for the agent.
    timeout_seconds: Option<u64>,
    prev_result: Option<Value>,
}

/// A failed invocation, as a CNI error (`code`, `msg`, `details` on stdout).
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("environment: {what}")]
    Environment { what: String },
    #[error("network configuration on stdin: {what}")]
    Decode { what: String },
    #[error("network configuration {network:?}: {what}")]
    Config { network: String, what: String },
    #[error("CNI version {version:?} is not supported (supported: {SUPPORTED_VERSIONS:?})")]
    Version { version: String },
    #[error(
        "policy-agent on this node did not answer for pod {pod}: {source}; the pod stays without \
         network until the agent runs (kubectl -n policy-agent get pods -o wide)"
    )]
    Unreachable {
        pod: String,
        #[source]
        source: ControlError,
    },
    #[error("policy-agent did not enforce pod {pod}: {reason}")]
    Refused { pod: String, reason: String },
}

impl PluginError {
    /// The CNI error code (spec: 1–99 are the spec's, 100+ the plugin's).
    pub fn code(&self) -> u32 {
        match self {
            Self::Version { .. } => 1,
            Self::Environment { .. } => 4,
            Self::Decode { .. } => 6,
            Self::Config { .. } => 7,
            // "Try again later": the kubelet retries the sandbox.
            Self::Unreachable { .. } => 11,
            Self::Refused { .. } => 100,
        }
    }
}

/// How the plugin reaches the agent: one `POST` of a JSON body, the status code and the body.
pub trait Agent {
    fn post(
        &self,
        socket: &std::path::Path,
        path: &str,
        body: &str,
        timeout: Duration,
    ) -> Result<(u16, String), ControlError>;
}

/// The agent's socket, over HTTP/1.1 ([`control::request_within`]).
pub struct Socket;

impl Agent for Socket {
    fn post(
        &self,
        socket: &std::path::Path,
        path: &str,
        body: &str,
        timeout: Duration,
    ) -> Result<(u16, String), ControlError> {
        control::request_within(socket, "POST", path, Some(body), timeout)
    }
}

/// What to print and whether the invocation succeeded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub success: bool,
}

/// The plugin's process: the environment, stdin, then the outcome on stdout and the exit code.
pub fn main() -> std::process::ExitCode {
    use std::io::Read;
    let inv = Invocation::from_env(|k| std::env::var(k).ok());
    let mut stdin = String::new();
    if inv.command != "VERSION" {
        let _ = std::io::stdin().read_to_string(&mut stdin);
    }
    let out = run(&inv, &stdin, &Socket);
    println!("{}", out.stdout);
    if out.success {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// One invocation: `stdin` is the network configuration (absent for VERSION).
pub fn run(inv: &Invocation, stdin: &str, agent: &dyn Agent) -> Outcome {
    let version = serde_json::from_str::<Value>(stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(String::from))
        .unwrap_or_else(|| "1.0.0".into());
    match invoke(inv, stdin, agent) {
        Ok(stdout) => Outcome {
            stdout,
            success: true,
        },
        Err(e) => {
            let msg = e.to_string();
            let mut out = json!({"cniVersion": version, "code": e.code(), "msg": msg});
            let chain = crate::telemetry::error_chain(&e);
            if chain != msg {
                out["details"] = Value::String(chain);
            }
            Outcome {
                stdout: out.to_string(),
                success: false,
            }
        }
    }
}

fn invoke(inv: &Invocation, stdin: &str, agent: &dyn Agent) -> Result<String, PluginError> {
    if inv.command == "VERSION" {
        return Ok(
            json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
        );
    }
    let conf: NetConf = serde_json::from_str(stdin).map_err(|e| PluginError::Decode {
        what: e.to_string(),
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(PluginError::Version {
            version: conf.cni_version,
        });
    }
    let socket = conf
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let timeout = Duration::from_secs(conf.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS));
    match inv.command.as_str() {
        "ADD" | "CHECK" => attach(inv, &conf, &socket, timeout, agent),
        "DEL" => {
            if let (Ok(namespace), Ok(name)) =
                (inv.arg("K8S_POD_NAMESPACE"), inv.arg("K8S_POD_NAME"))
            {
                let body = serde_json::to_string(&DetachRequest {
                    namespace: namespace.into(),
                    name: name.into(),
                    container_id: inv.container_id.clone(),
                })
                .expect("serializable");
                // Best effort: the agent forgets the pod when the API deletes it anyway.
                if let Err(e) = agent.post(&socket, DETACH_PATH, &body, Duration::from_secs(2)) {
                    eprintln!(
                        "policy-agent-cni: DEL: {}",
                        crate::telemetry::error_chain(&e)
                    );
                }
            }
            Ok(String::new())
        }
        "STATUS" => agent
            .post(&socket, STATUS_PATH, "", Duration::from_secs(2))
            .map_err(|source| PluginError::Unreachable {
                pod: "(any)".into(),
                source,
            })
            .and_then(|(code, text)| match code {
                200 => Ok(String::new()),
                _ => Err(PluginError::Refused {
                    pod: "(any)".into(),
                    reason: text.trim().to_string(),
                }),
            }),
        "GC" => Ok(String::new()),
        other => Err(PluginError::Environment {
            what: format!("CNI_COMMAND {other:?} is not ADD, DEL, CHECK, VERSION, STATUS or GC"),
        }),
    }
}

fn attach(
    inv: &Invocation,
    conf: &NetConf,
    socket: &std::path::Path,
    timeout: Duration,
    agent: &dyn Agent,
) -> Result<String, PluginError> {
    let config_err = |what: &str| PluginError::Config {
        network: conf.name.clone(),
        what: what.to_string(),
    };
    let namespace = inv.arg("K8S_POD_NAMESPACE")?;
    let name = inv.arg("K8S_POD_NAME")?;
    if inv.container_id.is_empty() {
        return Err(PluginError::Environment {
            what: "CNI_CONTAINERID is empty".into(),
        });
    }
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        config_err(
            "no prevResult: policy-agent-cni chains after the plugin that creates the pod's \
             interface (ptp, bridge) in a configuration list",
        )
    })?;
    let ips = result_addresses(prev).map_err(|what| config_err(&what))?;
    if ips.is_empty() {
        return Err(config_err("prevResult has no ips[].address"));
    }
    let host_interfaces = prev["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["sandbox"].as_str().is_none_or(str::is_empty))
        .filter_map(|i| i["name"].as_str().map(String::from))
        .collect();
    let pod = format!("{namespace}/{name}");
    let request = AttachRequest {
        namespace: namespace.into(),
        name: name.into(),
        container_id: inv.container_id.clone(),
        netns: inv.netns.clone(),
        ips,
        host_interfaces,
        timeout_ms: timeout.as_millis() as u64,
    };
    let body = serde_json::to_string(&request).expect("serializable");
    // The agent answers by the deadline itself; the margin covers the exchange.
    let (code, text) = agent
        .post(socket, ATTACH_PATH, &body, timeout + Duration::from_secs(2))
        .map_err(|source| PluginError::Unreachable {
            pod: pod.clone(),
            source,
        })?;
    if code != 200 {
        return Err(PluginError::Refused {
            pod,
            reason: text.trim().to_string(),
        });
    }
    let reply: AttachReply = serde_json::from_str(&text).map_err(|e| PluginError::Refused {
        pod: pod.clone(),
        reason: format!("malformed answer {text:?}: {e}"),
    })?;
    eprintln!(
        "policy-agent-cni: {} enforced on {} (ifindex {}) after {} ms",
        reply.endpoint, reply.ifname, reply.ifindex, reply.waited_ms
    );
    // The previous result is this plugin's result: it changes nothing of the interfaces.
    let mut result = prev.clone();
    if let Some(o) = result.as_object_mut() {
        o.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
    }
    Ok(result.to_string())
}

/// `ips[].address` of a CNI result (`10.244.1.5/24`), without the prefix length.
fn result_addresses(result: &Value) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for (i, ip) in result["ips"].as_array().into_iter().flatten().enumerate() {
        let text = ip["address"].as_str().unwrap_or_default();
        let addr = text.split('/').next().unwrap_or_default();
        let parsed = addr
            .parse::<IpAddr>()
            .map_err(|_| format!("prevResult.ips[{i}].address {text:?} is not an address"))?;
        if !out.contains(&parsed) {
            out.push(parsed);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, path::Path};

    use super::*;

    /// Records requests; answers with a fixed response.
    struct Fake {
        answer: Result<(u16, String), ()>,
        seen: RefCell<Vec<(String, String, Duration)>>,
    }

    impl Agent for Fake {
        fn post(
            &self,
            socket: &Path,
            path: &str,
            body: &str,
            timeout: Duration,
        ) -> Result<(u16, String), ControlError> {
            self.seen
                .borrow_mut()
                .push((path.to_string(), body.to_string(), timeout));
            self.answer.clone().map_err(|()| ControlError::Connect {
                path: socket.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
        }
    }

    fn fake(answer: Result<(u16, String), ()>) -> Fake {
        Fake {
            answer,
            seen: RefCell::new(Vec::new()),
        }
    }

    fn inv(command: &str) -> Invocation {
        Invocation::from_env(|k| {
            Some(
                match k {
                    "CNI_COMMAND" => command,
                    "CNI_CONTAINERID" => "c0ffee",
                    "CNI_NETNS" => "/var/run/netns/cni-1",
                    "CNI_IFNAME" => "eth0",
                    "CNI_ARGS" => {
                        "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a;K8S_POD_UID=u"
                    }
                    _ => return None,
                }
                .to_string(),
            )
        })
    }

    const CONF: &str = r#"{"cniVersion":"0.4.0","name":"kindnet","type":"policy-agent-cni",
        "socket":"/tmp/a.sock","timeoutSeconds":3,
        "prevResult":{"cniVersion":"0.4.0",
          "interfaces":[{"name":"veth1234","mac":"aa"},{"name":"eth0","sandbox":"/var/run/netns/cni-1"}],
          "ips":[{"version":"4","address":"10.244.1.5/24","interface":1},
                 {"version":"6","address":"fd00:10:244:1::5/64","interface":1}]}}"#;

    fn ok_reply() -> Result<(u16, String), ()> {
        Ok((
            200,
            serde_json::to_string(&AttachReply {
                endpoint: "x/a".into(),
                ifindex: 7,
                ifname: "veth1234".into(),
                waited_ms: 3,
            })
            .unwrap(),
        ))
    }

    #[test]
    fn add_announces_the_previous_result_and_passes_it_on() {
        let agent = fake(ok_reply());
        let out = run(&inv("ADD"), CONF, &agent);
        assert!(out.success, "{}", out.stdout);
        let printed: Value = serde_json::from_str(&out.stdout).unwrap();
        let conf: Value = serde_json::from_str(CONF).unwrap();
        assert_eq!(printed, conf["prevResult"]);
        let seen = agent.seen.borrow();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, ATTACH_PATH);
        assert_eq!(seen[0].2, Duration::from_secs(5));
        let req: AttachRequest = serde_json::from_str(&seen[0].1).unwrap();
        assert_eq!(
            req,
            AttachRequest {
                namespace: "x".into(),
                name: "a".into(),
                container_id: "c0ffee".into(),
                netns: "/var/run/netns/cni-1".into(),
                ips: vec![
                    "10.244.1.5".parse().unwrap(),
                    "fd00:10:244:1::5".parse().unwrap()
                ],
                host_interfaces: vec!["veth1234".into()],
                timeout_ms: 3000,
            }
        );
    }

    #[test]
    fn add_fails_closed_with_a_cni_error() {
        let refused = run(
            &inv("ADD"),
            CONF,
            &fake(Ok((503, "endpoint x/a: POLICY full".into()))),
        );
        assert!(!refused.success);
        let e: Value = serde_json::from_str(&refused.stdout).unwrap();
        assert_eq!(e["code"], 100);
        assert_eq!(e["cniVersion"], "0.4.0");
        assert!(e["msg"].as_str().unwrap().contains("POLICY full"), "{e}");

        let down = run(&inv("ADD"), CONF, &fake(Err(())));
        assert!(!down.success);
        let e: Value = serde_json::from_str(&down.stdout).unwrap();
        assert_eq!(e["code"], 11);
        assert!(e["msg"].as_str().unwrap().contains("/tmp/a.sock"), "{e}");

        let mut conf: Value = serde_json::from_str(CONF).unwrap();
        conf.as_object_mut().unwrap().remove("prevResult");
        let alone = run(&inv("ADD"), &conf.to_string(), &fake(ok_reply()));
        let e: Value = serde_json::from_str(&alone.stdout).unwrap();
        assert_eq!(e["code"], 7);
        assert!(e["msg"].as_str().unwrap().contains("prevResult"), "{e}");

        conf["prevResult"] = json!({"ips": [{"address": "10.0.0.300/24"}]});
        let bad = run(&inv("ADD"), &conf.to_string(), &fake(ok_reply()));
        let e: Value = serde_json::from_str(&bad.stdout).unwrap();
        assert!(e["msg"].as_str().unwrap().contains("ips[0].address"), "{e}");

        let mut no_pod = inv("ADD");
        no_pod.args.remove("K8S_POD_NAME");
        let e: Value = serde_json::from_str(&run(&no_pod, CONF, &fake(ok_reply())).stdout).unwrap();
        assert_eq!(e["code"], 4);
    }

    #[test]
    fn del_succeeds_without_the_agent_and_version_lists_versions() {
        let agent = fake(Err(()));
        let out = run(&inv("DEL"), CONF, &agent);
        assert!(out.success);
        assert_eq!(out.stdout, "");
        let req: DetachRequest = serde_json::from_str(&agent.seen.borrow()[0].1).unwrap();
        assert_eq!(req.container_id, "c0ffee");

        let v = run(&inv("VERSION"), "", &fake(Err(())));
        let v: Value = serde_json::from_str(&v.stdout).unwrap();
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);

        let mut old: Value = serde_json::from_str(CONF).unwrap();
        old["cniVersion"] = json!("0.2.0");
        let e: Value =
            serde_json::from_str(&run(&inv("ADD"), &old.to_string(), &fake(ok_reply())).stdout)
                .unwrap();
        assert_eq!(e["code"], 1);
        let status = run(&inv("STATUS"), CONF, &fake(Err(())));
        assert!(!status.success);
    }
}
