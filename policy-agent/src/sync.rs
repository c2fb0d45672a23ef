//! One sync: compile the cluster for this node, then bring the kernel to it.
//!
//! # Write order (no window where a denied flow passes)
//!
//! 1. **Upserts** of IPCACHE, POLICY and SERVICES entries: allow entries exist before anything
//!    that needs them is isolated.
//! 2. **Endpoints**: per local pod, its ENDPOINTS entry (id, isolation flags) and then its
//!    programs on the host veth (an attached veth without an entry drops everything). A pod is
//!    therefore never isolated before its allow entries exist, and never attached before its
//!    entry says how to treat it. A pod whose entries could not be written is marked
//!    `NOT_PROGRAMMED` (the programs drop its new flows: fail closed, logged, counted). Gone pods
//!    are detached, then their entries removed.
//! 3. **Removals** of IPCACHE, POLICY and SERVICES entries, last: nothing still selected loses an
//!    allow entry before its endpoint stopped needing it.
//!
//! The first sync after a start (and any sync after a failed write) compares against what the
//! pinned maps really hold ([`Enforcer::sync_maps`]) instead of against the previous
//! compilation, and maps the compiler's numbers onto the kernel's ([`crate::numbering`]), so a
//! restarted agent swaps its state in with no gap.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use policy_common::{EndpointInfo, endpoint_flags, map_names};
use tracing::{error, info, warn};

use crate::{
    compiler::{
        Compilation, Compiler, NodeContext,
        output::{MapDiff, NodeMaps},
    },
    dataplane::{Dataplane, DataplaneError, Role},
    endpoints::HostInterface,
    model::{Cluster, ObjectKey},
    numbering::{Adopted, Numbering},
};

/// The kernel side of a sync. Implemented by [`Dataplane`]; tests use a recording fake.
pub trait Enforcer {
    /// Upserts and removals of IPCACHE, POLICY and SERVICES (endpoint entries are ignored).
    fn apply(&mut self, diff: &MapDiff) -> Result<(), DataplaneError>;
    /// Makes IPCACHE, POLICY and SERVICES equal to `desired`, comparing against the maps.
    fn sync_maps(&mut self, desired: &NodeMaps) -> Result<(), DataplaneError>;
    fn upsert_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), DataplaneError>;
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DataplaneError>;
    fn attach_endpoint(&mut self, ifname: &str) -> Result<(), DataplaneError>;
    fn attach_uplink(&mut self, ifname: &str) -> Result<(), DataplaneError>;
    fn detach(&mut self, ifname: &str) -> Result<(), DataplaneError>;
    /// Interfaces with our programs attached (adopted ones included).
    fn attached(&self) -> Vec<(String, Role)>;
    /// What the maps held when this enforcer was opened.
    fn adopted(&self) -> Adopted;
}

impl Enforcer for Dataplane {
    fn apply(&mut self, diff: &MapDiff) -> Result<(), DataplaneError> {
        let r = Dataplane::apply(self, diff)?;
        tracing::debug!(
            upserted = r.upserted,
            removed = r.removed,
            unchanged = r.unchanged,
            bumped = r.endpoints_bumped,
            "map writes"
        );
        Ok(())
    }
    fn sync_maps(&mut self, desired: &NodeMaps) -> Result<(), DataplaneError> {
        let r = Dataplane::sync(self, desired)?;
        tracing::debug!(
            upserted = r.upserted,
            removed = r.removed,
            unchanged = r.unchanged,
            bumped = r.endpoints_bumped,
            "map writes (compared with the maps)"
        );
        Ok(())
    }
    fn upsert_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), DataplaneError> {
        Dataplane::upsert_endpoint(self, ifindex, info)
    }
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        Dataplane::remove_endpoint(self, ifindex)
    }
    fn attach_endpoint(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        Dataplane::attach_endpoint(self, ifname)
    }
    fn attach_uplink(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        Dataplane::attach_uplink(self, ifname)
    }
    fn detach(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        Dataplane::detach(self, ifname)
    }
    fn attached(&self) -> Vec<(String, Role)> {
        Dataplane::attached(self)
    }
    fn adopted(&self) -> Adopted {
        let s = &self.shadow;
        Adopted {
            endpoints: s.endpoints.clone(),
            ipcache_v4: s.ipcache_v4.clone(),
            ipcache_v6: s.ipcache_v6.clone(),
            policy_identities: s.policy.keys().map(|k| k.identity).collect(),
        }
    }
}

/// A pod's endpoint as written to the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Programmed {
    pub ifindex: u32,
    pub ifname: String,
    pub info: EndpointInfo,
}

/// What one sync achieved.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Everything desired is in the kernel: every map write succeeded and every local endpoint
    /// has its interface found, its entry written and its programs attached.
    pub complete: bool,
    /// Problems of this sync (each names the pod, interface or map).
    pub problems: Vec<String>,
    /// Endpoints attached with their entry written (the `NOT_PROGRAMMED` ones included).
    pub endpoints_enforced: usize,
    /// Of those, the ones flagged `NOT_PROGRAMMED` (their new flows are dropped: a failed map
    /// write, or allow entries that do not fit POLICY).
    pub endpoints_not_programmed: usize,
    pub endpoints_no_interface: usize,
    pub endpoints_failed: usize,
    /// Map writes failed (fail-closed flags were set where they could be).
    pub maps_failed: bool,
    pub uplinks_failed: usize,
    /// Uplink and tunnel devices that carry `to_network` after this sync.
    pub uplinks_attached: usize,
}

/// Compiles and writes; owns the compiler, the number translation and the enforcer.
pub struct Syncer<E: Enforcer> {
    enforcer: E,
    compiler: Compiler,
    numbering: Numbering,
    /// Adopted state, consumed by the first write.
    adopted: Option<Adopted>,
    /// What the kernel holds (kernel numbers), when known exactly; `None` forces a comparison
    /// against the maps themselves.
    applied: Option<NodeMaps>,
    programmed: BTreeMap<ObjectKey, Programmed>,
}

impl<E: Enforcer> Syncer<E> {
    pub fn new(enforcer: E) -> Self {
        let adopted = enforcer.adopted();
        if !adopted.endpoints.is_empty() {
            info!(
                endpoints = adopted.endpoints.len(),
                "adopting the state pinned by a previous agent"
            );
        }
        Self {
            enforcer,
            compiler: Compiler::new(),
            numbering: Numbering::new(),
            adopted: Some(adopted),
            applied: None,
            programmed: BTreeMap::new(),
        }
    }

    pub fn enforcer(&self) -> &E {
        &self.enforcer
    }

    pub fn enforcer_mut(&mut self) -> &mut E {
        &mut self.enforcer
    }

    pub fn into_enforcer(self) -> E {
        self.enforcer
    }

    pub fn compiler(&self) -> &Compiler {
        &self.compiler
    }

    pub fn numbering(&self) -> &Numbering {
        &self.numbering
    }

    /// What the kernel holds, in kernel numbers (after a successful sync).
    pub fn applied(&self) -> Option<&NodeMaps> {
        self.applied.as_ref()
    }

    /// Local endpoints as written.
    pub fn programmed(&self) -> &BTreeMap<ObjectKey, Programmed> {
        &self.programmed
    }

    /// The maps for this node (compiler numbers).
    pub fn compile(&mut self, cluster: &Cluster, node: &NodeContext) -> Compilation {
        self.compiler.compile(cluster, node)
    }

    /// Local pods and their addresses: what endpoint discovery must find.
    pub fn local_pods(compilation: &Compilation) -> BTreeMap<ObjectKey, Vec<IpAddr>> {
        compilation
            .maps
            .endpoints
            .iter()
            .map(|(k, e)| (k.clone(), e.addresses.clone()))
            .collect()
    }

    /// Writes `compilation` to the kernel. `found`: the host interface of each local pod that
    /// has one; `present`: ifindex → name of every interface in the namespace; `uplinks`: the
    /// devices that must carry `to_network`.
    pub fn write(
        &mut self,
        compilation: &Compilation,
        found: &BTreeMap<ObjectKey, HostInterface>,
        present: &BTreeMap<u32, String>,
        uplinks: &[String],
    ) -> Report {
        let mut report = Report::default();
        let adopted = self.adopted.take();
        if let Some(adopted) = &adopted {
            let ifindex_of = found.iter().map(|(k, h)| (k.clone(), h.ifindex)).collect();
            self.numbering
                .adopt(adopted, &compilation.maps, &ifindex_of);
        }
        let desired = self.numbering.translate(&compilation.maps);
        let (upserts, removals) = match &self.applied {
            Some(applied) => split(applied.diff(&desired)),
            None => (everything(&desired), None),
        };

        // 1. Allow entries first.
        let mut not_programmed_all = false;
        let mut not_programmed: BTreeSet<u32> = BTreeSet::new();
        if let Err(e) = self.enforcer.apply(&upserts) {
            error!(error = %e, "writing map entries failed; affected endpoints fail closed");
            report.maps_failed = true;
            report.problems.push(format!("writing maps: {e}"));
            if failed_map(&e) == Some(map_names::POLICY) {
                not_programmed.extend(upserts.policy_upsert.keys().map(|k| k.endpoint));
            } else {
                not_programmed_all = true;
            }
        }

        // 2. Endpoints.
        let mut previous = std::mem::take(&mut self.programmed);
        let previous_index_of: BTreeMap<String, u32> = previous
            .values()
            .map(|p| (p.ifname.clone(), p.ifindex))
            .collect();
        let mut retired: Vec<Programmed> = Vec::new();
        for (pod, entry) in &desired.endpoints {
            let isolated = entry.flags
                & (endpoint_flags::INGRESS_ISOLATED | endpoint_flags::EGRESS_ISOLATED)
                != 0;
            let mut flags = entry.flags;
            if (not_programmed_all && isolated) || not_programmed.contains(&entry.id) {
                flags |= endpoint_flags::NOT_PROGRAMMED;
            }
            let info = EndpointInfo {
                id: entry.id,
                flags,
                generation: 0,
                identity: entry.identity,
            };
            let before = previous.remove(pod);
            let Some(host) = found.get(pod) else {
                report.endpoints_no_interface += 1;
                let addrs: Vec<String> = entry.addresses.iter().map(|a| a.to_string()).collect();
                report.problems.push(format!(
                    "Pod {pod}: no host interface carries {}; not enforced until it appears",
                    addrs.join(",")
                ));
                retired.extend(before);
                continue;
            };
            if let Some(p) = before
                && (p.ifindex != host.ifindex || p.ifname != host.name)
            {
                retired.push(p);
            }
            // The name may have been ours on an interface that vanished since: re-attach cleanly.
            let stale_name = previous_index_of
                .get(&host.name)
                .is_some_and(|i| *i != host.ifindex);
            match self.program_endpoint(host, info, stale_name) {
                Ok(()) => {
                    report.endpoints_enforced += 1;
                    if info.flags & endpoint_flags::NOT_PROGRAMMED != 0 {
                        report.endpoints_not_programmed += 1;
                    }
                    self.programmed.insert(
                        pod.clone(),
                        Programmed {
                            ifindex: host.ifindex,
                            ifname: host.name.clone(),
                            info,
                        },
                    );
                }
                Err(e) => {
                    report.endpoints_failed += 1;
                    error!(pod = %pod, interface = %host.name, error = %e, "endpoint not enforced");
                    report
                        .problems
                        .push(format!("Pod {pod}: interface {}: {e}", host.name));
                }
            }
        }
        retired.extend(previous.into_values());
        self.retire(retired, &mut report);
        if let Some(adopted) = &adopted {
            self.retire_adopted(adopted, present, &mut report);
        }
        self.sync_uplinks(uplinks, &mut report);

        // 3. Removals last.
        let removed = match (&removals, report.maps_failed) {
            (_, true) => Err(None),
            (Some(r), false) => self.enforcer.apply(r).map_err(Some),
            (None, false) => self.enforcer.sync_maps(&desired).map_err(Some),
        };
        match removed {
            Ok(()) => {
                if adopted.is_some() || removals.is_none() {
                    self.numbering.release_reserved();
                }
                self.applied = Some(desired);
            }
            Err(e) => {
                if let Some(e) = e {
                    error!(error = %e, "removing map entries failed");
                    report.maps_failed = true;
                    report.problems.push(format!("removing map entries: {e}"));
                }
                self.applied = None;
            }
        }
        report.complete = !report.maps_failed
            && report.endpoints_failed == 0
            && report.endpoints_no_interface == 0
            && report.uplinks_failed == 0;
        report
    }

    /// The endpoint entry, then the programs (an attached veth without an entry drops).
    fn program_endpoint(
        &mut self,
        host: &HostInterface,
        info: EndpointInfo,
        stale_name: bool,
    ) -> Result<(), DataplaneError> {
        if stale_name {
            self.enforcer.detach(&host.name)?;
        }
        self.enforcer.upsert_endpoint(host.ifindex, info)?;
        self.enforcer.attach_endpoint(&host.name)
    }

    /// Detaches and removes endpoints no longer wanted (pod gone, moved to another interface, or
    /// interface vanished), leaving alone interfaces a current endpoint uses.
    fn retire(&mut self, retired: Vec<Programmed>, report: &mut Report) {
        for p in retired {
            let name_in_use = self.programmed.values().any(|q| q.ifname == p.ifname);
            let index_in_use = self.programmed.values().any(|q| q.ifindex == p.ifindex);
            if !name_in_use && let Err(e) = self.enforcer.detach(&p.ifname) {
                warn!(interface = %p.ifname, error = %e, "detach failed");
                report.problems.push(format!("detaching {}: {e}", p.ifname));
            }
            if !index_in_use && let Err(e) = self.enforcer.remove_endpoint(p.ifindex) {
                warn!(ifindex = p.ifindex, error = %e, "removing endpoint failed");
                report
                    .problems
                    .push(format!("removing endpoint ifindex {}: {e}", p.ifindex));
            }
        }
    }

    /// After a restart: endpoints and attachments the previous agent left for pods that are gone.
    fn retire_adopted(
        &mut self,
        adopted: &Adopted,
        present: &BTreeMap<u32, String>,
        report: &mut Report,
    ) {
        let used_index: BTreeSet<u32> = self.programmed.values().map(|p| p.ifindex).collect();
        let used_name: BTreeSet<&str> = self
            .programmed
            .values()
            .map(|p| p.ifname.as_str())
            .collect();
        let mut stale: Vec<Programmed> = adopted
            .endpoints
            .iter()
            .filter(|(i, _)| !used_index.contains(i))
            .map(|(i, info)| Programmed {
                ifindex: *i,
                ifname: present.get(i).cloned().unwrap_or_default(),
                info: *info,
            })
            .collect();
        for (name, role) in self.enforcer.attached() {
            if role == Role::Endpoint
                && !used_name.contains(name.as_str())
                && !stale.iter().any(|s| s.ifname == name)
            {
                stale.push(Programmed {
                    ifindex: 0,
                    ifname: name,
                    info: EndpointInfo::default(),
                });
            }
        }
        for s in stale {
            if !s.ifname.is_empty()
                && let Err(e) = self.enforcer.detach(&s.ifname)
            {
                report.problems.push(format!("detaching {}: {e}", s.ifname));
            }
            if s.ifindex != 0
                && let Err(e) = self.enforcer.remove_endpoint(s.ifindex)
            {
                report
                    .problems
                    .push(format!("removing endpoint ifindex {}: {e}", s.ifindex));
            }
        }
    }

    fn sync_uplinks(&mut self, uplinks: &[String], report: &mut Report) {
        for name in uplinks {
            if self.programmed.values().any(|p| &p.ifname == name) {
                continue; // a pod's veth is never an uplink
            }
            match self.enforcer.attach_uplink(name) {
                Ok(()) => report.uplinks_attached += 1,
                Err(e) => {
                    report.uplinks_failed += 1;
                    error!(interface = %name, error = %e, "attaching to uplink failed");
                    report.problems.push(format!("uplink {name}: {e}"));
                }
            }
        }
        for (name, role) in self.enforcer.attached() {
            if role == Role::Uplink
                && !uplinks.contains(&name)
                && let Err(e) = self.enforcer.detach(&name)
            {
                report
                    .problems
                    .push(format!("detaching uplink {name}: {e}"));
            }
        }
    }
}

/// A diff's upserts and its removals, as two diffs.
fn split(diff: MapDiff) -> (MapDiff, Option<MapDiff>) {
    let upserts = MapDiff {
        ipcache_v4_upsert: diff.ipcache_v4_upsert,
        ipcache_v6_upsert: diff.ipcache_v6_upsert,
        policy_upsert: diff.policy_upsert,
        services_add: diff.services_add,
        ..Default::default()
    };
    let removals = MapDiff {
        ipcache_v4_remove: diff.ipcache_v4_remove,
        ipcache_v6_remove: diff.ipcache_v6_remove,
        policy_remove: diff.policy_remove,
        services_remove: diff.services_remove,
        ..Default::default()
    };
    (upserts, Some(removals))
}

/// Every entry of `desired` as an upsert (the writer skips those already in place).
fn everything(desired: &NodeMaps) -> MapDiff {
    MapDiff {
        ipcache_v4_upsert: desired.ipcache_v4.clone(),
        ipcache_v6_upsert: desired.ipcache_v6.clone(),
        policy_upsert: desired.policy.clone(),
        services_add: desired.services.clone(),
        ..Default::default()
    }
}

fn failed_map(e: &DataplaneError) -> Option<&'static str> {
    match e {
        DataplaneError::MapFull { map, .. }
        | DataplaneError::MapUpdate { map, .. }
        | DataplaneError::Map { map, .. } => Some(map),
        _ => None,
    }
}
