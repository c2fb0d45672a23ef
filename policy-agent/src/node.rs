//! This node: its own addresses (always allowed into local pods) and its uplinks (where
//! `to_network` decides Service traffic leaving for other nodes).
//!
//! Given addresses (`--node-ip`) win; otherwise every unicast address of the agent's network
//! namespace, IPv4 and IPv6, is a node address. The compiler adds the Node object's addresses
//! (InternalIP, …, of both families) and the hostIPs local pods report, so a node whose address is
//! not on an interface here (a NAT in front) is still recognised. Whatever the source, IPv6
//! link-local addresses are not node addresses ([`crate::model::node_address`]): they name no
//! node, and the host's link-local traffic to pods is ICMPv6, which the datapath never polices. Given uplinks (`--uplink`) win; otherwise the devices of default
//! routes and of routes through a gateway, plus flannel's tunnel devices (`flannel.1`,
//! `flannel-v6.1`, `flannel-wg`, `flannel-wg-v6`) when present — never a local pod's veth.

use std::{collections::BTreeSet, net::IpAddr};

use crate::endpoints::{HostInterface, HostView};

#[derive(Clone, Debug, Default)]
pub struct NodeSettings {
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub uplinks: Vec<String>,
}

impl NodeSettings {
    pub fn node_ips(&self, view: &HostView) -> Vec<IpAddr> {
        if self.ips.is_empty() {
            view.node_addresses().into_iter().collect()
        } else {
            self.ips.clone()
        }
    }

    pub fn uplinks<'a>(
        &self,
        view: &HostView,
        endpoints: impl IntoIterator<Item = &'a HostInterface>,
    ) -> Vec<String> {
        if !self.uplinks.is_empty() {
            return self.uplinks.clone();
        }
        let pods: BTreeSet<&str> = endpoints.into_iter().map(|h| h.name.as_str()).collect();
        view.uplinks()
            .into_iter()
            .filter(|u| !pods.contains(u.as_str()))
            .collect()
    }
}
