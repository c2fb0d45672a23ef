//! The manifest-directory source: parsing (multi-document, List, every kind), API-server
//! defaults, invalid input reported with file / document / object / field and skipped (a
//! NetworkPolicy failing closed), and the watcher with the `.revision` protocol.

mod common;

use std::{fs, path::Path, time::Duration};

use policy_agent::{
    compiler::Compiler,
    evaluator::{self, Flow, Outcome, Peer, Protocol, Verdict},
    model::ObjectKey,
    sources::{
        Change, ClusterStore, Kind, Update,
        manifest::{self, INVALID_ANNOTATION, RevisionFile},
    },
};
use tokio::sync::mpsc;

const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: a, labels: {app: a}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 80, name: http}]}]}
status: {podIP: 10.244.1.2, podIPs: [{ip: 10.244.1.2}], hostIP: 172.18.0.2}
---
# a pod in a namespace nobody defined, and without namespace at all
apiVersion: v1
kind: Pod
metadata: {namespace: y, name: b}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {namespace: x, name: s}
  spec: {clusterIP: 10.96.0.10, selector: {app: a}, ports: [{port: 80, targetPort: http}]}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {namespace: x, name: p}
  spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: v1
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 172.18.0.2}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: x, name: s-1, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.2]}]
ports: [{port: 80, protocol: TCP}]
"#;

fn store_of(update: Update) -> ClusterStore {
    let mut store = ClusterStore::default();
    store.apply(update);
    store
}

#[test]
fn parses_every_kind_with_api_server_defaults() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("cluster.yaml"), GOOD).unwrap();
    let scan = manifest::scan(dir.path());
    assert!(scan.errors.is_empty(), "{:?}", scan.errors);
    assert_eq!(scan.revision, RevisionFile::Missing);
    let store = store_of(scan.into_update(1));
    let c = &store.cluster;
    assert_eq!(c.pods.len(), 3);
    assert!(
        c.pods.contains_key(&ObjectKey::new("default", "c")),
        "default namespace"
    );
    assert_eq!(c.services.len(), 1);
    assert_eq!(c.policies.len(), 1);
    assert_eq!(c.nodes.len(), 1);
    assert_eq!(store.endpoint_slices.len(), 1);
    for ns in ["x", "y", "default"] {
        let labels = c.namespaces[ns].metadata.labels.as_ref().unwrap();
        assert_eq!(labels["kubernetes.io/metadata.name"], ns, "{ns}");
    }
    assert_eq!(
        c.namespaces["x"].metadata.labels.as_ref().unwrap()["team"],
        "a"
    );
    let backends = store.service_backends();
    assert_eq!(
        backends[&("10.244.1.2".parse().unwrap(), 80, 6)],
        ObjectKey::new("x", "s")
    );
}

#[test]
fn invalid_objects_are_reported_precisely_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a-good.yaml"), GOOD).unwrap();
    fs::write(
        dir.path().join("b-bad.yaml"),
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: cm}
---
apiVersion: v2
kind: Pod
metadata: {name: wrong-version}
---
apiVersion: v1
kind: Pod
metadata: {labels: {a: b}}
---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: bad-port}
spec: {containers: [{name: c, ports: [{containerPort: eighty}]}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: fine}
spec: {containers: [{name: c}]}
"#,
    )
    .unwrap();
    let scan = manifest::scan(dir.path());
    let errors = scan.errors.join("\n");
    for expected in [
        "b-bad.yaml: document 1: kind: \"ConfigMap\"",
        "b-bad.yaml: document 2: Pod \"wrong-version\": apiVersion",
        "b-bad.yaml: document 3: Pod: metadata.name: missing",
        "b-bad.yaml: document 4: Pod \"bad-port\": spec.containers[0].ports[0].containerPort",
    ] {
        assert!(errors.contains(expected), "{expected:?} in\n{errors}");
    }
    let store = store_of(scan.into_update(1));
    assert!(
        store
            .cluster
            .pods
            .contains_key(&ObjectKey::new("x", "fine"))
    );
    assert!(
        !store
            .cluster
            .pods
            .contains_key(&ObjectKey::new("x", "bad-port"))
    );
    assert_eq!(
        store.cluster.pods.len(),
        4,
        "the rest of the directory applies"
    );
}

#[test]
fn invalid_network_policy_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("p.yaml"),
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: typo}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - ports: [{port: 80, endPort: many}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: worse}
spec:
  podSelector: {matchLabels: [not, a, map]}
  egress: []
"#,
    )
    .unwrap();
    let scan = manifest::scan(dir.path());
    assert!(
        scan.errors
            .iter()
            .any(|e| e.contains("\"typo\"") && e.contains("spec.ingress[0].ports[0].endPort")),
        "{:?}",
        scan.errors
    );
    let store = store_of(scan.into_update(1));
    let typo = &store.cluster.policies[&ObjectKey::new("x", "typo")];
    let spec = typo.spec.as_ref().unwrap();
    assert_eq!(
        spec.pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["app"],
        "web",
        "still selects what it meant to"
    );
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_string(), "Egress".to_string()][..])
    );
    assert!(
        spec.ingress.is_none() && spec.egress.is_none(),
        "allows nothing"
    );
    assert!(typo.metadata.annotations.as_ref().unwrap()[INVALID_ANNOTATION].contains("endPort"));
    let worse = &store.cluster.policies[&ObjectKey::new("x", "worse")];
    assert_eq!(
        worse.spec.as_ref().unwrap().pod_selector,
        Some(Default::default()),
        "an unreadable podSelector isolates the whole namespace"
    );
}

#[test]
fn broken_yaml_keeps_the_documents_before_it() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("p.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: ok}\n---\nkind: [unclosed\n",
    )
    .unwrap();
    let scan = manifest::scan(dir.path());
    assert_eq!(scan.errors.len(), 1, "{:?}", scan.errors);
    assert!(scan.errors[0].contains("p.yaml: document 2"));
    assert!(
        store_of(scan.into_update(1))
            .cluster
            .namespaces
            .contains_key("ok")
    );
}

async fn next(rx: &mut mpsc::Receiver<Update>) -> Update {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("an update")
        .expect("source running")
}

fn write(dir: &Path, name: &str, text: &str) {
    // Write-and-rename, as editors and the lab do.
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, text).unwrap();
    fs::rename(tmp, dir.join(name)).unwrap();
}

#[tokio::test]
async fn watcher_follows_changes_and_the_revision_file() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "cluster.yaml", GOOD);
    write(dir.path(), ".revision", "5\n");
    let (tx, mut rx) = mpsc::channel(8);
    let task = tokio::spawn(manifest::run(
        dir.path().to_owned(),
        Duration::from_millis(10),
        tx,
    ));
    let first = next(&mut rx).await;
    assert_eq!(first.revision, 5);
    assert!(
        first
            .changes
            .iter()
            .any(|c| matches!(c, Change::Replace(Kind::Pod, objects) if objects.len() == 3))
    );

    // Nothing changes: nothing is sent.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), rx.recv())
            .await
            .is_err()
    );

    // New manifests, then a new revision: the update carries both.
    write(
        dir.path(),
        "more.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: z}\n",
    );
    write(dir.path(), ".revision", "6");
    let mut store = ClusterStore::default();
    let mut update = next(&mut rx).await;
    while update.revision < 6 {
        store.apply(update);
        update = next(&mut rx).await;
    }
    store.apply(update);
    assert_eq!(store.revision, 6);
    assert!(store.cluster.namespaces.contains_key("z"));

    // A revision file caught empty never reports a revision ahead of what was written.
    fs::write(dir.path().join(".revision"), "").unwrap();
    let update = next(&mut rx).await;
    assert_eq!(update.revision, 6);
    // Deleting a file removes its objects.
    fs::remove_file(dir.path().join("more.yaml")).unwrap();
    write(dir.path(), ".revision", "7");
    let mut update = next(&mut rx).await;
    while update.revision < 7 {
        update = next(&mut rx).await;
    }
    store.apply(update);
    assert!(!store.cluster.namespaces.contains_key("z"));
    task.abort();
}

/// Two pods of namespace `x` on `node-1`, `a` (10.244.1.2) and `b` (10.244.1.3), and the node.
const TWO_PODS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 172.18.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: a, labels: {pod: a}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {podIP: 10.244.1.2, podIPs: [{ip: 10.244.1.2}], hostIP: 172.18.0.2}
---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: b, labels: {pod: b}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {podIP: 10.244.1.3, podIPs: [{ip: 10.244.1.3}], hostIP: 172.18.0.2}
"#;

fn tcp(from: &str, to: &str) -> Flow {
    let peer = |name: &str, ip: &str| Peer::Pod {
        pod: ObjectKey::new("x", name),
        ip: ip.parse().unwrap(),
    };
    let ip = |name: &str| {
        if name == "a" {
            "10.244.1.2"
        } else {
            "10.244.1.3"
        }
    };
    Flow {
        src: peer(from, ip(from)),
        dst: peer(to, ip(to)),
        protocol: Protocol::Tcp,
        port: 80,
    }
}

/// The compiled dataplane and the reference evaluator agree on every flow between `a` and `b`;
/// returns the evaluator's verdicts for a→b and b→a.
fn verdicts(store: &ClusterStore) -> (Verdict, Verdict) {
    let compiled = common::Compiled::new(&store.cluster, &["node-1"]);
    for (from, to) in [("a", "b"), ("b", "a")] {
        common::check_flow(&store.cluster, &compiled, &tcp(from, to)).unwrap();
    }
    (
        evaluator::evaluate(&store.cluster, &tcp("a", "b")),
        evaluator::evaluate(&store.cluster, &tcp("b", "a")),
    )
}

#[test]
fn a_policy_without_a_name_still_isolates_what_it_selects() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("pods.yaml"), TWO_PODS).unwrap();
    let open = store_of(manifest::scan(dir.path()).into_update(1));
    assert!(verdicts(&open).0.allowed, "nothing isolates b yet");

    let nameless = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: x}\n\
                    spec: {podSelector: {matchLabels: {pod: b}}, policyTypes: [Ingress]}\n";
    fs::write(
        dir.path().join("p.yaml"),
        format!("{nameless}---\n{nameless}"),
    )
    .unwrap();
    let scan = manifest::scan(dir.path());
    for document in [1, 2] {
        assert!(
            scan.errors.iter().any(|e| e.contains(&format!(
                "p.yaml: document {document}: NetworkPolicy: metadata.name: missing"
            )) && e.contains("deny-all")),
            "{:?}",
            scan.errors
        );
    }
    let store = store_of(scan.into_update(2));
    let keys: Vec<&ObjectKey> = store.cluster.policies.keys().collect();
    assert_eq!(
        keys.len(),
        2,
        "each nameless policy keyed on its own: {keys:?}"
    );
    for (key, document) in keys.iter().zip([1, 2]) {
        assert_eq!(key.namespace, "x");
        assert!(
            key.name.starts_with("<unnamed: ")
                && key.name.ends_with(&format!("p.yaml: document {document}>")),
            "{key}"
        );
    }
    let (to_b, from_b) = verdicts(&store);
    assert!(!to_b.allowed, "b is isolated for ingress: {to_b:?}");
    assert_eq!(to_b.ingress.outcome, Outcome::Denied);
    assert_eq!(to_b.ingress.isolating.len(), 2);
    assert!(
        from_b.allowed,
        "only the declared direction is isolated: {from_b:?}"
    );
}

#[test]
fn a_policy_with_a_wrong_api_version_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("pods.yaml"), TWO_PODS).unwrap();
    fs::write(
        dir.path().join("p.yaml"),
        "apiVersion: networking.k8s.io/v1beta1\nkind: NetworkPolicy\n\
         metadata: {namespace: x, name: old}\n\
         spec: {podSelector: {matchLabels: {pod: b}}, ingress: [{}]}\n",
    )
    .unwrap();
    let scan = manifest::scan(dir.path());
    assert!(
        scan.errors
            .iter()
            .any(|e| e.contains("NetworkPolicy \"old\": apiVersion") && e.contains("deny-all")),
        "{:?}",
        scan.errors
    );
    let store = store_of(scan.into_update(1));
    let (to_b, from_b) = verdicts(&store);
    assert!(!to_b.allowed, "its allow-all rule is not used: {to_b:?}");
    assert!(
        from_b.allowed,
        "it declares ingress only (by default): {from_b:?}"
    );
}

#[test]
fn labels_and_annotations_are_checked_as_the_api_server_does() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("pods.yaml"), TWO_PODS).unwrap();
    let long = "v".repeat(100);
    fs::write(
        dir.path().join("bad.yaml"),
        format!(
            r#"
apiVersion: v1
kind: Namespace
metadata: {{name: x, labels: {{x: {long}}}}}
---
apiVersion: v1
kind: Pod
metadata: {{namespace: x, name: c, labels: {{"a/b/c": v}}}}
spec: {{containers: [{{name: c}}]}}
---
apiVersion: v1
kind: Service
metadata: {{namespace: x, name: s, annotations: {{"-bad": v}}}}
spec: {{clusterIP: 10.96.0.10}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{namespace: x, name: s-1, labels: {{kubernetes.io/service-name: "-s"}}}}
addressType: IPv4
endpoints: []
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{namespace: x, name: labelled, labels: {{team: "a b"}}}}
spec: {{podSelector: {{matchLabels: {{pod: b}}}}, policyTypes: [Ingress], ingress: [{{}}]}}
"#
        ),
    )
    .unwrap();
    let scan = manifest::scan(dir.path());
    let errors = scan.errors.join("\n");
    for expected in [
        "bad.yaml: document 1: Namespace \"x\": metadata.labels[\"x\"]: value longer than 63 \
         characters; skipped",
        "bad.yaml: document 2: Pod \"c\": metadata.labels[\"a/b/c\"]: key has more than one '/'",
        "bad.yaml: document 3: Service \"s\": metadata.annotations[\"-bad\"]: key name",
        "bad.yaml: document 4: EndpointSlice \"s-1\": \
         metadata.labels[\"kubernetes.io/service-name\"]: value \"-s\"",
        "bad.yaml: document 5: NetworkPolicy \"labelled\": metadata.labels[\"team\"]: value \"a b\"",
    ] {
        assert!(errors.contains(expected), "{expected:?} in\n{errors}");
    }
    let store = store_of(scan.into_update(1));
    let c = &store.cluster;
    // The invalid objects are left out; everything else is enforced.
    assert!(!c.pods.contains_key(&ObjectKey::new("x", "c")));
    assert!(c.services.is_empty() && store.endpoint_slices.is_empty());
    assert_eq!(
        c.namespaces["x"].metadata.labels.as_ref().unwrap().len(),
        1,
        "the namespace exists implicitly, with its name label only"
    );
    // The policy with invalid labels fails closed: b isolated for ingress, its allow-all rule
    // not used.
    let (to_b, from_b) = verdicts(&store);
    assert_eq!(to_b.ingress.outcome, Outcome::Denied, "{to_b:?}");
    assert_eq!(
        to_b.ingress.isolating,
        vec![ObjectKey::new("x", "labelled")]
    );
    assert!(from_b.allowed);
}

#[test]
fn selectors_with_invalid_labels_reject_the_policy_in_compiler_and_evaluator() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("pods.yaml"), TWO_PODS).unwrap();
    let long = "b".repeat(64);
    fs::write(
        dir.path().join("p.yaml"),
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{namespace: x, name: p}}\n\
             spec:\n  podSelector: {{matchLabels: {{pod: b}}}}\n  policyTypes: [Ingress]\n  \
             ingress: [{{from: [{{podSelector: {{matchLabels: {{pod: {long}}}}}}}]}}, {{}}]\n"
        ),
    )
    .unwrap();
    let store = store_of(manifest::scan(dir.path()).into_update(1));
    let compiled = Compiler::new().compile(
        &store.cluster,
        &common::node_context(&store.cluster, "node-1"),
    );
    assert!(
        compiled.errors.iter().any(|e| e.field()
            == "spec.ingress[0].from[0].podSelector.matchLabels[\"pod\"]"
            && e.to_string().contains("longer than 63")),
        "{:?}",
        compiled.errors
    );
    let (to_b, from_b) = verdicts(&store);
    assert_eq!(
        to_b.ingress.outcome,
        Outcome::Denied,
        "rejected: its allow-all rule is not used: {to_b:?}"
    );
    assert!(from_b.allowed);
}

#[test]
fn a_document_nested_too_deep_is_rejected_unparsed_and_the_rest_applies() {
    let dir = tempfile::tempdir().unwrap();
    // 120 KB of brackets nested 60,000 deep, after a valid document of the same file.
    let deep = format!("{}{}", "[".repeat(60_000), "]".repeat(60_000));
    fs::write(
        dir.path().join("a-deep.yaml"),
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: before}}\n---\n{deep}\n"),
    )
    .unwrap();
    fs::write(dir.path().join("b-good.yaml"), GOOD).unwrap();
    let scan = manifest::scan(dir.path());
    assert_eq!(scan.errors.len(), 1, "{:?}", scan.errors);
    assert!(
        scan.errors[0].contains(
            "a-deep.yaml: document 2: nesting depth exceeds the limit of 100 (scan stopped \
             after 100 bytes)"
        ),
        "rejected by the pre-scan after reading 100 of its 120,000 bytes: {:?}",
        scan.errors
    );
    let store = store_of(scan.into_update(1));
    assert!(store.cluster.namespaces.contains_key("before"));
    assert_eq!(store.cluster.pods.len(), 3, "the other file applies");
}

#[test]
fn errors_found_after_parsing_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("pods.yaml"), TWO_PODS).unwrap();
    fs::write(
        dir.path().join("more.yaml"),
        r#"
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: odd}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {podIP: 10.244.1.999}
---
apiVersion: v1
kind: List
items:
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {namespace: x, name: cidr}
  spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}
"#,
    )
    .unwrap();
    let store = store_of(manifest::scan(dir.path()).into_update(1));
    let compiled = Compiler::new().compile(
        &store.cluster,
        &common::node_context(&store.cluster, "node-1"),
    );
    let described: Vec<String> = compiled.errors.iter().map(|e| store.describe(e)).collect();
    let file = dir.path().join("more.yaml").display().to_string();
    for expected in [
        format!("{file}: document 1: Pod x/odd: status.podIP"),
        format!("{file}: document 2: NetworkPolicy x/cidr: spec.ingress[0].from[0].ipBlock.cidr"),
    ] {
        assert!(
            described.iter().any(|d| d.starts_with(&expected)),
            "{expected:?} in {described:?}"
        );
    }
    // Objects whose origin is unknown (another source) are reported as before.
    let mut other = store.clone();
    other.origins.clear();
    assert!(
        compiled
            .errors
            .iter()
            .all(|e| other.describe(e) == e.to_string())
    );
}
