//! Reading the agents' recent flows (`GET /flows`, [`crate::flowstore`]) for `kubectl netpol
//! flows` and `advise`: from a lab (each node agent's control socket), from agents named on the
//! command line (a control socket path or an `--http-addr` served with `--http-flows`), or from
//! a cluster, through the API server's pod proxy to every agent pod (the agents must run with
//! `--http-flows`; the caller needs `get` on `pods/proxy` in the agent's namespace).

use std::path::{Path, PathBuf};

use crate::control;
use crate::flowstore::{self, FlowQuery, FlowRecord};

/// Where the flows are read.
#[derive(Clone, Debug)]
pub enum FlowSource {
    /// The control sockets of lab `prefix`'s agents.
    Lab(String),
    /// `unix:PATH` or a path: a control socket; `http://HOST:PORT` or `HOST:PORT`: an agent's
    /// HTTP port.
    Agents(Vec<String>),
    /// Every pod labelled `app.kubernetes.io/name=policy-agent` in `namespace`, through the pod
    /// proxy of the kubeconfig's API server.
    Cluster {
        kubeconfig: Option<PathBuf>,
        namespace: String,
    },
}

/// The label of the agent's pods (deploy/base).
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=policy-agent";
/// The agent's HTTP port when its pod names none `metrics`.
pub const DEFAULT_PORT: u16 = 9965;

/// Why flows could not be read, naming the agent.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{agent}: {source}")]
    Control {
        agent: String,
        #[source]
        source: control::ControlError,
    },
    #[error("{agent}: HTTP {code}: {body}{hint}")]
    Refused {
        agent: String,
        code: u16,
        body: String,
        hint: &'static str,
    },
    #[error("{agent}: {why}")]
    Malformed { agent: String, why: String },
    #[error("lab {prefix:?}: no agent control socket in {dir} (is the lab up?)")]
    NoLabAgents { prefix: String, dir: String },
    #[error("the cluster: {0}")]
    Kubernetes(String),
    #[error("query: {0}")]
    Query(#[from] flowstore::QueryError),
}

/// The flows every agent of `source` returns for `query`, merged oldest first; `query.limit`
/// applies to the merged list.
pub fn fetch(source: &FlowSource, query: &FlowQuery) -> Result<Vec<FlowRecord>, FetchError> {
    query.validate()?;
    let target = format!("/flows?{}", query.to_query_string());
    let mut all = Vec::new();
    for (agent, body) in get_all(source, &target)? {
        all.extend(
            flowstore::parse_lines(&body).map_err(|why| FetchError::Malformed { agent, why })?,
        );
    }
    all.sort_by_key(|r| r.time_ms);
    flowstore::keep_newest(&mut all, query.limit);
    Ok(all)
}

/// Every agent's `/explain` answer for `query` ([`crate::live`]), node by node.
pub fn explain(
    source: &FlowSource,
    query: &crate::live::ExplainQuery,
) -> Result<Vec<crate::live::LiveExplain>, FetchError> {
    get_all(source, &query.target())?
        .into_iter()
        .map(|(agent, body)| {
            serde_json::from_str(&body).map_err(|e| FetchError::Malformed {
                agent,
                why: e.to_string(),
            })
        })
        .collect()
}

/// `GET target` on every agent of `source`: (agent, body) of each 200 answer.
fn get_all(source: &FlowSource, target: &str) -> Result<Vec<(String, String)>, FetchError> {
    match source {
        FlowSource::Lab(prefix) => {
            let dir = super::state::lab_dir(prefix).join("control");
            let sockets = lab_sockets(&dir);
            if sockets.is_empty() {
                return Err(FetchError::NoLabAgents {
                    prefix: prefix.clone(),
                    dir: dir.display().to_string(),
                });
            }
            sockets.iter().map(|s| from_socket(s, target)).collect()
        }
        FlowSource::Agents(agents) => agents.iter().map(|a| from_agent(a, target)).collect(),
        FlowSource::Cluster {
            kubeconfig,
            namespace,
        } => from_cluster(kubeconfig.as_deref(), namespace, target),
    }
}

fn lab_sockets(dir: &Path) -> Vec<PathBuf> {
    let mut sockets: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    sockets.sort();
    sockets
}

/// The body of a 200 answer, else the refusal naming the agent.
fn answer(agent: String, code: u16, body: String) -> Result<(String, String), FetchError> {
    if code != 200 {
        return Err(refused(agent, code, &body));
    }
    Ok((agent, body))
}

fn refused(agent: String, code: u16, body: &str) -> FetchError {
    let hint = if code == 404 {
        " (an agent serves /flows and /explain on its HTTP port only with --http-flows, and \
         keeps no flows with --flow-records 0)"
    } else {
        ""
    };
    FetchError::Refused {
        agent,
        code,
        body: body.trim().into(),
        hint,
    }
}

fn from_socket(socket: &Path, target: &str) -> Result<(String, String), FetchError> {
    let agent = socket.display().to_string();
    let (code, body) =
        control::request(socket, "GET", target, None).map_err(|source| FetchError::Control {
            agent: agent.clone(),
            source,
        })?;
    answer(agent, code, body)
}

fn from_agent(agent: &str, target: &str) -> Result<(String, String), FetchError> {
    if let Some(path) = agent.strip_prefix("unix:") {
        return from_socket(Path::new(path), target);
    }
    if agent.starts_with('/') || agent.starts_with('.') {
        return from_socket(Path::new(agent), target);
    }
    let addr = agent.strip_prefix("http://").unwrap_or(agent);
    let addr = addr.trim_end_matches('/');
    let (code, body) =
        control::http_request(addr, target).map_err(|source| FetchError::Control {
            agent: agent.into(),
            source,
        })?;
    answer(agent.into(), code, body)
}

fn from_cluster(
    kubeconfig: Option<&Path>,
    namespace: &str,
    target: &str,
) -> Result<Vec<(String, String)>, FetchError> {
    use k8s_openapi::api::core::v1::Pod;
    let kube_err = |e: &dyn std::fmt::Display| FetchError::Kubernetes(e.to_string());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| kube_err(&e))?;
    runtime.block_on(async {
        let client = crate::sources::kubernetes::client(kubeconfig)
            .await
            .map_err(|e| kube_err(&e))?;
        let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
        let list = pods
            .list(&kube::api::ListParams::default().labels(AGENT_SELECTOR))
            .await
            .map_err(|e| {
                kube_err(&format!(
                    "listing pods {AGENT_SELECTOR} in {namespace}: {e}"
                ))
            })?;
        if list.items.is_empty() {
            return Err(kube_err(&format!(
                "no pod labelled {AGENT_SELECTOR} in namespace {namespace} (--agent-namespace?)"
            )));
        }
        let mut all = Vec::new();
        for pod in list.items {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let port = pod
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some("metrics"))
                .map_or(DEFAULT_PORT, |p| p.container_port as u16);
            let path = format!("/api/v1/namespaces/{namespace}/pods/{name}:{port}/proxy{target}");
            let agent = format!("pod {namespace}/{name}");
            let request = axum::http::Request::get(&path)
                .body(Vec::new())
                .map_err(|e| kube_err(&e))?;
            match client.request_text(request).await {
                Ok(body) => all.push((agent, body)),
                Err(kube::Error::Api(status)) => {
                    return Err(refused(agent, status.code, &status.message));
                }
                Err(e) => return Err(kube_err(&format!("{agent}: {e}"))),
            }
        }
        Ok(all)
    })
}

/// The flows as a table: time (UTC), node, verdict, direction, source → destination, protocol
/// and port, the deciding policy and rule, and the audit verdict when there is one.
pub fn table(records: &[FlowRecord]) -> String {
    let mut rows = vec![[
        "TIME".to_string(),
        "NODE".into(),
        "VERDICT".into(),
        "DIRECTION".into(),
        "FROM".into(),
        "TO".into(),
        "PORT".into(),
        "POLICY".into(),
        "AUDIT".into(),
    ]];
    for r in records {
        let f = &r.flow;
        let (from, to) = if f.direction == "ingress" {
            (f.peer.clone(), f.endpoint.clone())
        } else {
            (f.endpoint.clone(), f.peer.clone())
        };
        let to = match &f.service {
            Some(s) => format!("{to} (service {s})"),
            None => to,
        };
        let policy = match (&f.policy, &f.rule) {
            (Some(p), Some(r)) => format!("{p} {r}"),
            (Some(p), None) => p.clone(),
            _ => "-".into(),
        };
        let audit = r.audit.as_ref().map_or("-".into(), |a| {
            if a.rule.is_empty() {
                format!("{} {}", a.verdict, a.policy)
            } else {
                format!("{} {} {}", a.verdict, a.policy, a.rule)
            }
        });
        rows.push([
            clock(r.time_ms),
            r.node.clone(),
            f.verdict.clone(),
            f.direction.clone(),
            from,
            to,
            format!("{}/{}", f.protocol, f.dport),
            policy,
            audit,
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `HH:MM:SS.mmm` (UTC) of a Unix time in milliseconds.
fn clock(ms: u64) -> String {
    let day_ms = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flowstore::{AuditNote, tests::flow};

    #[test]
    fn the_table_reads_from_source_to_destination() {
        let mut egress = flow("allowed", "x/a", "y/b");
        egress.direction = "egress".into();
        egress.service = Some("y/web".into());
        egress.policy = Some("x/allow".into());
        egress.rule = Some("egress[0]".into());
        let records = [
            FlowRecord {
                time_ms: 3_723_004,
                node: "node-1".into(),
                flow: egress,
                audit: None,
            },
            FlowRecord {
                time_ms: 0,
                node: "node-2".into(),
                flow: flow("allowed", "y/b", "x/a"),
                audit: Some(AuditNote {
                    verdict: "would-drop".into(),
                    policy: "y/deny".into(),
                    rule: String::new(),
                }),
            },
        ];
        let text = table(&records);
        let lines: Vec<String> = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        assert!(lines[0].starts_with("TIME"), "{text}");
        assert!(
            lines[1].contains("01:02:03.004")
                && lines[1].contains("x/a y/b (service y/web)")
                && lines[1].contains("TCP/80")
                && lines[1].contains("x/allow egress[0]"),
            "{text}"
        );
        assert!(
            lines[2].contains("x/a y/b") && lines[2].ends_with("would-drop y/deny"),
            "ingress reads peer -> endpoint: {text}"
        );
    }

    #[test]
    fn an_unreachable_agent_and_a_bad_query_are_named() {
        let err = fetch(
            &FlowSource::Agents(vec!["unix:/nonexistent/agent.sock".into()]),
            &FlowQuery::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/agent.sock"), "{err}");
        let err = fetch(
            &FlowSource::Agents(vec![]),
            &FlowQuery {
                verdict: Some("maybe".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("field verdict"), "{err}");
    }
}
