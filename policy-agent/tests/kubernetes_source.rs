//! The Kubernetes source against a mocked API server: a tower service answering the list and
//! watch requests kube-rs makes, the way kube-rs projects test controllers without a cluster.
//!
//! Covered: initial list of every watched kind (nothing is sent before all are listed), watch
//! ADDED / MODIFIED / DELETED, a watch ERROR 410 Gone followed by a re-list that replaces the kind,
//! an API server that fails (500) while the last state is kept, and managed fields stripped.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures::channel::mpsc as fmpsc;
use http::{Request, Response, StatusCode};
use http_body_util::{Full, StreamBody, combinators::BoxBody};
use policy_agent::sources::{
    Change, ClusterStore, Kind, Object, SourceHealth, Update,
    kubernetes::{self, WATCHED},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

type MockBody = BoxBody<Bytes, Infallible>;

/// Per resource (plural): the current list, and the open watch streams.
#[derive(Default)]
struct Resource {
    items: Vec<Value>,
    resource_version: u64,
    watchers: Vec<fmpsc::UnboundedSender<Result<http_body::Frame<Bytes>, Infallible>>>,
    lists: usize,
    fail_lists: bool,
}

#[derive(Clone, Default)]
struct MockApi {
    resources: Arc<Mutex<HashMap<String, Resource>>>,
}

impl MockApi {
    fn new() -> Self {
        let api = Self::default();
        for (_, plural) in WATCHED {
            api.resources
                .lock()
                .unwrap()
                .insert((*plural).to_owned(), Resource::default());
        }
        api
    }

    fn set_items(&self, plural: &str, items: Vec<Value>) {
        let mut r = self.resources.lock().unwrap();
        let res = r.get_mut(plural).expect("watched resource");
        res.resource_version += 1;
        res.items = items;
    }

    fn set_fail_lists(&self, plural: &str, fail: bool) {
        self.resources
            .lock()
            .unwrap()
            .get_mut(plural)
            .unwrap()
            .fail_lists = fail;
    }

    fn lists(&self, plural: &str) -> usize {
        self.resources.lock().unwrap()[plural].lists
    }

    fn open_watches(&self, plural: &str) -> usize {
        self.resources.lock().unwrap()[plural]
            .watchers
            .iter()
            .filter(|w| !w.is_closed())
            .count()
    }

    /// Sends one watch event line to every open watch of `plural`.
    fn push(&self, plural: &str, event_type: &str, object: Value) {
        let mut r = self.resources.lock().unwrap();
        let res = r.get_mut(plural).unwrap();
        let line = format!("{}\n", json!({"type": event_type, "object": object}));
        res.watchers.retain(|w| {
            w.unbounded_send(Ok(http_body::Frame::data(Bytes::from(line.clone()))))
                .is_ok()
        });
    }

    /// Ends every open watch of `plural` with an ERROR 410 Gone event, as an API server does when
    /// the watched resourceVersion is too old.
    fn gone(&self, plural: &str) {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410});
        self.push(plural, "ERROR", status);
        self.resources
            .lock()
            .unwrap()
            .get_mut(plural)
            .unwrap()
            .watchers
            .clear();
    }

    fn handle(&self, req: Request<kube::client::Body>) -> Response<MockBody> {
        let path = req.uri().path().to_owned();
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let plural = path.rsplit('/').next().unwrap_or("").to_owned();
        let mut r = self.resources.lock().unwrap();
        let Some(res) = r.get_mut(&plural) else {
            return status(StatusCode::NOT_FOUND, "no such resource");
        };
        if query.get("watch").map(String::as_str) == Some("true") {
            let (tx, rx) = fmpsc::unbounded();
            res.watchers.push(tx);
            return Response::new(BoxBody::new(StreamBody::new(rx)));
        }
        res.lists += 1;
        if res.fail_lists {
            return status(StatusCode::INTERNAL_SERVER_ERROR, "etcd unavailable");
        }
        let list = json!({
            "kind": "List", "apiVersion": "v1",
            "metadata": {"resourceVersion": res.resource_version.to_string()},
            "items": res.items,
        });
        Response::new(BoxBody::new(Full::new(Bytes::from(list.to_string()))))
    }
}

fn status(code: StatusCode, message: &str) -> Response<MockBody> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": message, "code": code.as_u16()});
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(BoxBody::new(Full::new(Bytes::from(body.to_string()))))
        .unwrap()
}

fn client(api: &MockApi) -> kube::Client {
    let api = api.clone();
    let service = tower::service_fn(move |req: Request<kube::client::Body>| {
        let api = api.clone();
        async move { Ok::<_, Infallible>(api.handle(req)) }
    });
    kube::Client::new(service, "default")
}

fn pod(ns: &str, name: &str, ip: &str, rv: u64) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "resourceVersion": rv.to_string(),
            "labels": {"app": name},
            "managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1"}]},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "resourceVersion": "1",
            "labels": {"kubernetes.io/metadata.name": name}}})
}

fn policy(ns: &str, name: &str, rv: u64) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name, "resourceVersion": rv.to_string()},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
}

async fn next_update(rx: &mut mpsc::Receiver<Update>) -> Update {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an update within 10 s")
        .expect("source running")
}

/// Waits until `plural` has an open watch (so pushed events are not lost).
async fn watching(api: &MockApi, plural: &str) {
    for _ in 0..500 {
        if api.open_watches(plural) > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no watch opened on {plural}");
}

/// The Pods an update carries, as the source sends them (the store keeps only their projection).
fn pods_in(update: &Update) -> Vec<&Object> {
    update
        .changes
        .iter()
        .flat_map(|c| match c {
            Change::Apply(o) => std::slice::from_ref(o),
            Change::Replace(_, objects) => objects.as_slice(),
            Change::Delete(..) => &[],
        })
        .filter(|o| o.kind() == Kind::Pod)
        .collect()
}

fn pod_names(store: &ClusterStore) -> Vec<String> {
    store.cluster.pods.keys().map(|k| k.to_string()).collect()
}

#[tokio::test]
async fn list_watch_gone_relist_and_outage() {
    let api = MockApi::new();
    api.set_items("namespaces", vec![namespace("a")]);
    api.set_items("pods", vec![pod("a", "p1", "10.244.1.2", 1)]);
    api.set_items("networkpolicies", vec![policy("a", "deny", 1)]);
    let (tx, mut rx) = mpsc::channel(16);
    let health = SourceHealth::default();
    let source = tokio::spawn(kubernetes::run(client(&api), tx, health.clone()));
    let mut store = ClusterStore::default();

    // 1. The first update holds the complete initial list of every kind.
    let first = next_update(&mut rx).await;
    let replaced: BTreeMap<Kind, usize> = first
        .changes
        .iter()
        .filter_map(|c| match c {
            Change::Replace(kind, objects) => Some((*kind, objects.len())),
            _ => None,
        })
        .collect();
    assert_eq!(
        replaced.keys().copied().collect::<Vec<_>>(),
        {
            let mut all = Kind::ALL.to_vec();
            all.sort();
            all
        },
        "every kind is listed before anything is sent"
    );
    assert_eq!(replaced[&Kind::Pod], 1);
    let p1 = pods_in(&first)[0].metadata();
    assert!(p1.managed_fields.is_none(), "managed fields are stripped");
    store.apply(first);
    assert_eq!(store.revision, 6);
    assert_eq!(pod_names(&store), ["a/p1"]);
    assert_eq!(store.cluster.policies.len(), 1);

    // 2. Watch events.
    watching(&api, "pods").await;
    api.push("pods", "ADDED", pod("a", "p2", "10.244.1.3", 2));
    let update = next_update(&mut rx).await;
    let added = pods_in(&update);
    assert!(
        !added.is_empty() && added.iter().all(|p| p.metadata().managed_fields.is_none()),
        "managed fields are stripped from watched objects too"
    );
    store.apply(update);
    assert_eq!(pod_names(&store), ["a/p1", "a/p2"]);
    assert_eq!(store.revision, 7);

    let mut relabeled = pod("a", "p2", "10.244.1.3", 3);
    relabeled["metadata"]["labels"]["app"] = json!("other");
    api.push("pods", "MODIFIED", relabeled);
    store.apply(next_update(&mut rx).await);
    let p2 = &store.cluster.pods[&policy_agent::model::ObjectKey::new("a", "p2")];
    assert_eq!(p2.labels["app"], "other");

    watching(&api, "networkpolicies").await;
    api.push("networkpolicies", "DELETED", policy("a", "deny", 2));
    store.apply(next_update(&mut rx).await);
    assert!(store.cluster.policies.is_empty());

    // 3. 410 Gone: the watcher re-lists; the new list replaces the kind (p1 vanished while the
    //    watch was broken, p3 appeared).
    let lists_before = api.lists("pods");
    api.set_items(
        "pods",
        vec![
            pod("a", "p2", "10.244.1.3", 10),
            pod("a", "p3", "10.244.1.4", 11),
        ],
    );
    api.gone("pods");
    let update = next_update(&mut rx).await;
    assert!(
        update
            .changes
            .iter()
            .any(|c| matches!(c, Change::Replace(Kind::Pod, objects) if objects.len() == 2)),
        "a completed re-list replaces the pods: {:?}",
        update
            .changes
            .iter()
            .map(|c| format!("{c:?}").len())
            .collect::<Vec<_>>()
    );
    store.apply(update);
    assert_eq!(pod_names(&store), ["a/p2", "a/p3"]);
    assert!(
        api.lists("pods") > lists_before,
        "410 Gone triggers a re-list"
    );

    // 4. API server failing: lists return 500 after the watch breaks. The source reports the error
    //    and sends no change: the last known state stays.
    watching(&api, "pods").await;
    api.set_fail_lists("pods", true);
    api.gone("pods");
    let update = next_update(&mut rx).await;
    assert!(update.changes.is_empty(), "an outage changes nothing");
    assert!(
        update.errors.iter().any(|e| e.contains("Pod")),
        "the outage is reported: {:?}",
        update.errors
    );
    let revision = store.revision;
    store.apply(update);
    assert_eq!(store.revision, revision);
    assert_eq!(pod_names(&store), ["a/p2", "a/p3"], "last known state kept");
    assert!(
        health.errors().iter().any(|e| e.contains("Pod")),
        "the outage reaches /readyz and /status: {:?}",
        health.errors()
    );

    // 5. Recovery: the backoff retries; the next successful list replaces the kind and clears the
    //    error.
    api.set_items("pods", vec![pod("a", "p3", "10.244.1.4", 12)]);
    api.set_fail_lists("pods", false);
    let update = loop {
        let u = next_update(&mut rx).await;
        if !u.changes.is_empty() {
            break u;
        }
    };
    assert!(update.errors.is_empty(), "{:?}", update.errors);
    assert!(health.errors().is_empty(), "{:?}", health.errors());
    store.apply(update);
    assert_eq!(pod_names(&store), ["a/p3"]);
    source.abort();
}

/// A kind that cannot be listed from the start (a permission missing, say) holds back the first
/// update — a partial view would leave pods open — but is reported at once.
#[tokio::test]
async fn failing_initial_list_is_reported_before_any_update() {
    let api = MockApi::new();
    api.set_items("namespaces", vec![namespace("a")]);
    api.set_fail_lists("pods", true);
    let (tx, mut rx) = mpsc::channel(16);
    let health = SourceHealth::default();
    let source = tokio::spawn(kubernetes::run(client(&api), tx, health.clone()));
    let mut reported = false;
    for _ in 0..500 {
        if health.errors().iter().any(|e| e.contains("Pod")) {
            reported = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        reported,
        "the failing list is reported: {:?}",
        health.errors()
    );
    assert!(
        rx.try_recv().is_err(),
        "no update before every kind has listed"
    );
    api.set_fail_lists("pods", false);
    let first = next_update(&mut rx).await;
    assert!(
        first
            .changes
            .iter()
            .any(|c| matches!(c, Change::Replace(Kind::Pod, _)))
    );
    assert!(health.errors().is_empty(), "{:?}", health.errors());
    source.abort();
}

#[test]
fn watched_kinds_match_the_store_kinds() {
    assert_eq!(WATCHED.len(), Kind::ALL.len());
    let plurals: Vec<&str> = WATCHED.iter().map(|(_, p)| *p).collect();
    for p in [
        "pods",
        "namespaces",
        "services",
        "nodes",
        "networkpolicies",
        "endpointslices",
    ] {
        assert!(plurals.contains(&p), "{p}");
    }
}
