//! The agent's side of CNI chaining: pods announced by `policy-agent-cni` and the ADDs waiting
//! for their endpoints.
//!
//! An announcement lends the CNI's addresses to the pod ([`Announcements::overlay`]) until the
//! API reports them in `status.podIPs` (then the API is the truth again), the sandbox is deleted
//! (CNI DEL), or the pod has been gone from the API for [`FORGET_ABSENT`]. A waiting ADD is
//! answered after the first sync that attached the pod's endpoint to the announced host interface
//! without `NOT_PROGRAMMED`, or with an error at its deadline naming what the last sync reported
//! for the pod.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use policy_common::endpoint_flags;
use tokio::sync::oneshot;

use super::{AttachReply, AttachRequest, DetachRequest};
use crate::{
    model::{Cluster, ObjectKey},
    sync::Programmed,
};

/// An announced pod missing from the API this long (it was deleted, or never bound here) is
/// forgotten.
pub const FORGET_ABSENT: Duration = Duration::from_secs(120);

/// What the agent answers a waiting ADD: the endpoint, or why not.
pub type Answer = Result<AttachReply, String>;

/// One ADD (or CHECK) in flight.
pub struct Attach {
    pub request: AttachRequest,
    pub reply: oneshot::Sender<Answer>,
}

struct Announced {
    container_id: String,
    ips: Vec<IpAddr>,
    since: Instant,
}

struct Waiter {
    pod: ObjectKey,
    host_interfaces: Vec<String>,
    arrived: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Answer>,
}

/// What one [`Announcements::answer`] answered.
#[derive(Debug, Default)]
pub struct Answered {
    /// How long each enforced ADD waited.
    pub enforced: Vec<Duration>,
    pub refused: usize,
}

/// Announced pods and waiting ADDs.
#[derive(Default)]
pub struct Announcements {
    pods: BTreeMap<ObjectKey, Announced>,
    waiters: Vec<Waiter>,
}

impl Announcements {
    /// Records an ADD arriving at `now`.
    pub fn announce(&mut self, attach: Attach, now: Instant) {
        let Attach { request, reply } = attach;
        let pod = ObjectKey::new(&request.namespace, &request.name);
        self.pods.insert(
            pod.clone(),
            Announced {
                container_id: request.container_id,
                ips: request.ips,
                since: now,
            },
        );
        self.waiters.push(Waiter {
            pod,
            host_interfaces: request.host_interfaces,
            arrived: now,
            deadline: now + Duration::from_millis(request.timeout_ms),
            reply,
        });
    }

    /// CNI DEL: forgets the sandbox's addresses (a newer sandbox's announcement stays).
    pub fn detach(&mut self, request: &DetachRequest) {
        let pod = ObjectKey::new(&request.namespace, &request.name);
        if self
            .pods
            .get(&pod)
            .is_some_and(|a| a.container_id == request.container_id)
        {
            self.pods.remove(&pod);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty() && self.waiters.is_empty()
    }

    /// `cluster` with each announced pod bound to `node` given its announced addresses, and
    /// announcements the API has caught up with (or forgotten) dropped.
    pub fn overlay<'a>(
        &mut self,
        mut cluster: Cow<'a, Cluster>,
        node: &str,
        now: Instant,
    ) -> Cow<'a, Cluster> {
        self.pods.retain(|key, a| match cluster.pods.get(key) {
            None => now.duration_since(a.since) < FORGET_ABSENT,
            Some(pod) => !same_addresses(&pod.ips, &a.ips),
        });
        for (key, a) in &self.pods {
            let Some(pod) = cluster.pods.get(key) else {
                continue;
            };
            if pod.node_name.as_deref() != Some(node) || pod.host_network || pod.terminated {
                continue;
            }
            let ips: Box<[IpAddr]> = a.ips.clone().into();
            if let Some(pod) = cluster.to_mut().pods.get_mut(key) {
                pod.ips = ips;
            }
        }
        cluster
    }

    /// Answers the waiters the last sync satisfied, and those past their deadline with the
    /// sync's problems naming their pod.
    pub fn answer(
        &mut self,
        programmed: &BTreeMap<ObjectKey, Programmed>,
        problems: &[String],
        now: Instant,
    ) -> Answered {
        let mut answered = Answered::default();
        let mut keep = Vec::new();
        for w in self.waiters.drain(..) {
            if w.reply.is_closed() {
                continue;
            }
            let enforced = programmed.get(&w.pod).filter(|p| {
                p.info.flags & endpoint_flags::NOT_PROGRAMMED == 0
                    && (w.host_interfaces.is_empty() || w.host_interfaces.contains(&p.ifname))
            });
            let answer = match enforced {
                Some(p) => Ok(AttachReply {
                    endpoint: w.pod.to_string(),
                    ifindex: p.ifindex,
                    ifname: p.ifname.clone(),
                    waited_ms: now.duration_since(w.arrived).as_millis() as u64,
                }),
                None if now >= w.deadline => Err(refusal(&w, programmed, problems, now)),
                None => {
                    keep.push(w);
                    continue;
                }
            };
            match &answer {
                Ok(_) => answered.enforced.push(now.duration_since(w.arrived)),
                Err(_) => answered.refused += 1,
            }
            let _ = w.reply.send(answer);
        }
        self.waiters = keep;
        answered
    }

    /// The earliest deadline of a waiting ADD.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiters.iter().map(|w| w.deadline).min()
    }
}

fn same_addresses(a: &[IpAddr], b: &[IpAddr]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.contains(x))
}

fn refusal(
    w: &Waiter,
    programmed: &BTreeMap<ObjectKey, Programmed>,
    problems: &[String],
    now: Instant,
) -> String {
    let prefix = format!("Pod {}:", w.pod);
    let mine: Vec<&str> = problems
        .iter()
        .filter(|p| p.contains(&prefix))
        .map(String::as_str)
        .collect();
    let state = match programmed.get(&w.pod) {
        Some(p) if p.info.flags & endpoint_flags::NOT_PROGRAMMED != 0 => format!(
            "its endpoint on {} is NOT_PROGRAMMED (it drops every new flow)",
            p.ifname
        ),
        Some(p) => format!(
            "its endpoint is attached to {}, not to the CNI's {:?}",
            p.ifname, w.host_interfaces
        ),
        None if mine.is_empty() => {
            "the agent has no endpoint for it (is the pod bound to this node in the agent's view \
             of the API yet?)"
                .to_string()
        }
        None => "the agent has no endpoint for it".to_string(),
    };
    let mut out = format!(
        "pod {} not enforced within {} ms: {state}",
        w.pod,
        now.duration_since(w.arrived).as_millis()
    );
    for p in mine {
        out.push_str("; ");
        out.push_str(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use policy_common::EndpointInfo;

    use super::*;
    use crate::model::PodInfo;

    fn request(name: &str, ips: &[&str], timeout_ms: u64) -> AttachRequest {
        AttachRequest {
            namespace: "x".into(),
            name: name.into(),
            container_id: format!("sandbox-{name}"),
            netns: String::new(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            host_interfaces: vec![format!("veth-{name}")],
            timeout_ms,
        }
    }

    fn cluster(pods: &[(&str, &str, &[&str])]) -> Cluster {
        let mut c = Cluster::default();
        for (name, node, ips) in pods {
            c.pods.insert(
                ObjectKey::new("x", *name),
                PodInfo {
                    node_name: Some((*node).into()),
                    ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
                    ..Default::default()
                },
            );
        }
        c
    }

    fn programmed(name: &str, ifname: &str, flags: u32) -> BTreeMap<ObjectKey, Programmed> {
        BTreeMap::from([(
            ObjectKey::new("x", name),
            Programmed {
                ifindex: 9,
                ifname: ifname.into(),
                info: EndpointInfo {
                    id: 1,
                    flags,
                    generation: 0,
                    identity: 5,
                },
            },
        )])
    }

    #[test]
    fn announced_addresses_stand_in_until_the_api_reports_them() {
        let t0 = Instant::now();
        let mut a = Announcements::default();
        let (tx, _rx) = oneshot::channel();
        a.announce(
            Attach {
                request: request("a", &["10.244.1.5"], 1000),
                reply: tx,
            },
            t0,
        );
        // Bound here, no address in the API yet; b elsewhere; c unannounced.
        let c = cluster(&[("a", "n1", &[]), ("b", "n2", &[]), ("c", "n1", &[])]);
        let view = a.overlay(Cow::Borrowed(&c), "n1", t0);
        assert_eq!(
            &*view.pods[&ObjectKey::new("x", "a")].ips,
            &["10.244.1.5".parse::<IpAddr>().unwrap()]
        );
        assert!(view.pods[&ObjectKey::new("x", "c")].ips.is_empty());
        // Another node's agent lends nothing.
        let view = a.overlay(Cow::Borrowed(&c), "n2", t0);
        assert!(matches!(view, Cow::Borrowed(_)));
        // A stale status (a previous sandbox's address) is overridden too.
        let stale = cluster(&[("a", "n1", &["10.244.1.4"])]);
        let view = a.overlay(Cow::Borrowed(&stale), "n1", t0);
        assert_eq!(
            view.pods[&ObjectKey::new("x", "a")].ips[0].to_string(),
            "10.244.1.5"
        );
        // The API caught up: the announcement goes.
        let caught = cluster(&[("a", "n1", &["10.244.1.5"])]);
        let _ = a.overlay(Cow::Borrowed(&caught), "n1", t0);
        assert!(a.pods.is_empty());
    }

    #[test]
    fn del_and_absence_forget_an_announcement() {
        let t0 = Instant::now();
        let mut a = Announcements::default();
        for name in ["a", "b"] {
            let (tx, _rx) = oneshot::channel();
            a.announce(
                Attach {
                    request: request(name, &["10.244.1.5"], 1000),
                    reply: tx,
                },
                t0,
            );
        }
        // DEL of an older sandbox leaves the newer announcement.
        a.detach(&DetachRequest {
            namespace: "x".into(),
            name: "a".into(),
            container_id: "older".into(),
        });
        assert_eq!(a.pods.len(), 2);
        a.detach(&DetachRequest {
            namespace: "x".into(),
            name: "a".into(),
            container_id: "sandbox-a".into(),
        });
        assert_eq!(a.pods.len(), 1);
        let empty = Cluster::default();
        let _ = a.overlay(Cow::Borrowed(&empty), "n1", t0 + Duration::from_secs(1));
        assert_eq!(a.pods.len(), 1, "the API may not have the pod yet");
        let _ = a.overlay(Cow::Borrowed(&empty), "n1", t0 + FORGET_ABSENT);
        assert!(a.pods.is_empty());
    }

    #[test]
    fn waiters_are_answered_when_enforced_or_at_their_deadline() {
        let t0 = Instant::now();
        let mut a = Announcements::default();
        let (tx, mut rx) = oneshot::channel();
        a.announce(
            Attach {
                request: request("a", &["10.244.1.5"], 500),
                reply: tx,
            },
            t0,
        );
        assert_eq!(a.next_deadline(), Some(t0 + Duration::from_millis(500)));
        // Attached elsewhere, or NOT_PROGRAMMED: not yet.
        a.answer(&programmed("a", "veth-other", 0), &[], t0);
        a.answer(
            &programmed("a", "veth-a", endpoint_flags::NOT_PROGRAMMED),
            &[],
            t0,
        );
        assert!(rx.try_recv().is_err());
        a.answer(
            &programmed("a", "veth-a", 0),
            &[],
            t0 + Duration::from_millis(7),
        );
        let reply = rx.try_recv().unwrap().unwrap();
        assert_eq!((reply.ifname.as_str(), reply.waited_ms), ("veth-a", 7));
        assert_eq!(a.next_deadline(), None);

        let (tx, mut rx) = oneshot::channel();
        a.announce(
            Attach {
                request: request("b", &["10.244.1.6"], 500),
                reply: tx,
            },
            t0,
        );
        let problems = [
            "Pod x/b: no host interface carries 10.244.1.6; not enforced until it appears"
                .to_string(),
            "Pod x/bb: unrelated".to_string(),
        ];
        a.answer(&BTreeMap::new(), &problems, t0 + Duration::from_millis(499));
        assert!(rx.try_recv().is_err());
        a.answer(&BTreeMap::new(), &problems, t0 + Duration::from_millis(500));
        let e = rx.try_recv().unwrap().unwrap_err();
        assert!(e.contains("not enforced within 500 ms"), "{e}");
        assert!(e.contains("no host interface carries 10.244.1.6"), "{e}");
        assert!(!e.contains("unrelated"), "{e}");
    }
}
