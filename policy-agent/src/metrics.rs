//! Prometheus metrics (prometheus-client). Every label has a fixed, small set of values (map
//! names, drop reasons, endpoint states, sync stages): nothing user-controlled, nothing
//! Debug-formatted.

use std::collections::HashMap;

use policy_common::Reason;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabel {
    /// `would-drop` or `would-allow` ([`crate::audit::Finding::verdict`]).
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: &'static str,
}

/// Endpoint states reported by `policy_agent_endpoints`.
pub mod endpoint_state {
    /// Interface found, programs attached, entry written with its allow entries.
    pub const ENFORCED: &str = "enforced";
    /// Attached and written, but flagged `NOT_PROGRAMMED`: its allow entries could not be
    /// written (or do not fit POLICY), so its new flows are dropped (fail closed).
    pub const NOT_PROGRAMMED: &str = "not_programmed";
    /// A local pod whose host interface cannot be found (yet).
    pub const NO_INTERFACE: &str = "no_interface";
    /// Interface found but attaching or writing its entry failed.
    pub const FAILED: &str = "failed";
    pub const ALL: [&str; 4] = [ENFORCED, NOT_PROGRAMMED, NO_INTERFACE, FAILED];
}

/// Sync stages reported by `policy_agent_sync_errors_total`.
pub mod stage {
    pub const MAPS: &str = "maps";
    pub const ENDPOINTS: &str = "endpoints";
    pub const DISCOVERY: &str = "discovery";
    pub const UPLINKS: &str = "uplinks";
    pub const ALL: [&str; 4] = [MAPS, ENDPOINTS, DISCOVERY, UPLINKS];
}

pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub enforcement_latency: Histogram,
    pub map_entries: Family<MapLabel, Gauge>,
    pub map_pressure: Family<MapLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub packets: Family<ReasonLabels, Counter>,
    pub compile_errors: Gauge,
    pub input_errors: Gauge,
    pub source_errors: Gauge,
    pub source_lists: Counter,
    pub endpoints: Family<StateLabel, Gauge>,
    pub sync_errors: Family<StageLabel, Counter>,
    pub syncs: Counter,
    pub revision: Gauge,
    pub enforced_revision: Gauge,
    pub flow_events: Counter,
    /// New flows whose verdict enforcing the audited policies would change.
    pub audit_verdicts: Family<VerdictLabel, Counter>,
    pub uplinks_attached: Gauge,
    pub mark_mask_conflicts: Gauge,
    /// 1 while `policy-agent-cni` is chained in the node's CNI configuration (with
    /// `--cni-conf-dir`).
    pub cni_chained: Gauge,
    pub cni_chain_repairs: Counter,
    pub cni_attaches: Counter,
    pub cni_refusals: Counter,
    pub cni_attach_duration: Histogram,
    /// Last absolute kernel counter per reason, to turn them into counter increments.
    last_packets: std::sync::Mutex<HashMap<u32, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("policy_agent");
        let m = Self {
            sync_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            enforcement_latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            map_entries: Family::default(),
            map_pressure: Family::default(),
            packets: Family::default(),
            compile_errors: Gauge::default(),
            input_errors: Gauge::default(),
            source_errors: Gauge::default(),
            source_lists: Counter::default(),
            endpoints: Family::default(),
            sync_errors: Family::default(),
            syncs: Counter::default(),
            revision: Gauge::default(),
            enforced_revision: Gauge::default(),
            flow_events: Counter::default(),
            audit_verdicts: Family::default(),
            uplinks_attached: Gauge::default(),
            mark_mask_conflicts: Gauge::default(),
            cni_chained: Gauge::default(),
            cni_chain_repairs: Counter::default(),
            cni_attaches: Counter::default(),
            cni_refusals: Counter::default(),
            cni_attach_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            last_packets: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "sync_duration_seconds",
            "Time to compile the cluster state and write the changes to the kernel",
            m.sync_duration.clone(),
        );
        registry.register(
            "enforcement_latency_seconds",
            "From a change in the source (manifest mtime, watch event arrival) to its enforcement",
            m.enforcement_latency.clone(),
        );
        registry.register(
            "map_entries",
            "Entries in each eBPF map, counted in the kernel",
            m.map_entries.clone(),
        );
        registry.register(
            "map_pressure_ratio",
            "Entries over max_entries of each eBPF map (1 = full)",
            m.map_pressure.clone(),
        );
        registry.register(
            "packets",
            "Packets seen by the eBPF programs, by verdict and reason",
            m.packets.clone(),
        );
        registry.register(
            "compile_errors",
            "Objects the compiler rejected in the last sync (enforced fail-closed)",
            m.compile_errors.clone(),
        );
        registry.register(
            "input_errors",
            "Invalid objects or unreadable input reported by the source",
            m.input_errors.clone(),
        );
        registry.register(
            "source_errors",
            "Watched kinds the source cannot currently read (API server down, permission missing); the last state stays enforced",
            m.source_errors.clone(),
        );
        registry.register(
            "source_lists",
            "Complete lists of a watched kind (the initial one, and re-lists after 410 Gone or a broken watch)",
            m.source_lists.clone(),
        );
        registry.register("endpoints", "Local endpoints by state", m.endpoints.clone());
        registry.register(
            "sync_errors",
            "Failed writes by sync stage",
            m.sync_errors.clone(),
        );
        registry.register("syncs", "Completed syncs", m.syncs.clone());
        registry.register(
            "revision",
            "Latest source revision received",
            m.revision.clone(),
        );
        registry.register(
            "enforced_revision",
            "Latest source revision whose maps are in the kernel",
            m.enforced_revision.clone(),
        );
        registry.register(
            "flow_events",
            "Verdict events read from the ring buffer",
            m.flow_events.clone(),
        );
        registry.register(
            "audit_verdicts",
            "New flows whose verdict the NetworkPolicies in audit would change, by would-drop / would-allow",
            m.audit_verdicts.clone(),
        );
        for verdict in ["would-drop", "would-allow"] {
            let _ = m.audit_verdicts.get_or_create(&VerdictLabel { verdict });
        }
        registry.register(
            "uplinks_attached",
            "Uplink and tunnel devices carrying to_network after the last sync; 0 = Service traffic of egress-isolated pods to backends on other nodes leaves unchecked",
            m.uplinks_attached.clone(),
        );
        registry.register(
            "mark_mask_conflicts",
            "Netfilter rules (nft, iptables, ip6tables) using skb->mark bits of --mark-mask, at the last check",
            m.mark_mask_conflicts.clone(),
        );
        registry.register(
            "cni_chained",
            "1 while policy-agent-cni is the last plugin of the node's CNI configuration (--cni-conf-dir); 0 = new pods may send before their endpoint is enforced",
            m.cni_chained.clone(),
        );
        registry.register(
            "cni_chain_repairs",
            "Times the node's CNI configuration was found rewritten without policy-agent-cni and chained again",
            m.cni_chain_repairs.clone(),
        );
        registry.register(
            "cni_attaches",
            "CNI ADDs received from policy-agent-cni",
            m.cni_attaches.clone(),
        );
        registry.register(
            "cni_refusals",
            "CNI ADDs answered with an error (endpoint not enforced by the deadline): the pod's sandbox fails and is retried",
            m.cni_refusals.clone(),
        );
        registry.register(
            "cni_attach_duration_seconds",
            "From a CNI ADD reaching the agent to its endpoint enforced (the start-up delay the chained plugin adds)",
            m.cni_attach_duration.clone(),
        );
        for state in endpoint_state::ALL {
            let _ = m.endpoints.get_or_create(&StateLabel { state });
        }
        for stage in stage::ALL {
            let _ = m.sync_errors.get_or_create(&StageLabel { stage });
        }
        Self { registry, ..m }
    }

    /// Records how many entries a map holds in the kernel, against its `max_entries`.
    pub fn set_map_entries(&self, map: &'static str, entries: u64, capacity: u32) {
        self.map_entries
            .get_or_create(&MapLabel { map })
            .set(entries as i64);
        self.map_pressure
            .get_or_create(&MapLabel { map })
            .set(entries as f64 / f64::from(capacity.max(1)));
    }

    /// Records absolute per-reason packet counts read from the kernel.
    pub fn set_packet_counts(&self, counts: &[(Reason, u64)]) {
        let mut last = self.last_packets.lock().unwrap_or_else(|e| e.into_inner());
        for (reason, total) in counts {
            let previous = last.insert(*reason as u32, *total).unwrap_or(0);
            // A smaller value means the maps were recreated: count from zero again.
            let delta = total.checked_sub(previous).unwrap_or(*total);
            self.packets
                .get_or_create(&ReasonLabels {
                    reason: reason.as_str(),
                    verdict: if reason.is_drop() {
                        "dropped"
                    } else {
                        "allowed"
                    },
                })
                .inc_by(delta);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_bounded_labels() {
        let m = Metrics::new();
        m.set_map_entries(policy_common::map_names::POLICY, 512, 1024);
        m.set_packet_counts(&[(Reason::DroppedPolicy, 5)]);
        m.set_packet_counts(&[(Reason::DroppedPolicy, 7)]);
        let text = m.encode();
        assert!(
            text.contains("policy_agent_map_pressure_ratio{map=\"POLICY\"} 0.5"),
            "{text}"
        );
        assert!(
            text.contains(
                "policy_agent_packets_total{reason=\"dropped_policy\",verdict=\"dropped\"} 7"
            ),
            "{text}"
        );
        assert!(text.contains("policy_agent_endpoints{state=\"no_interface\"} 0"));
    }
}
