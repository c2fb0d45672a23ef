//! Endpoint discovery in network namespaces, for both CNI shapes the agent supports: kindnet-style
//! ptp (host route `podIP/32 dev vethX`) and flannel-style bridge (`cni0`, pod netns → eth0 →
//! peer ifindex). Also: a pod of another node is not claimed, an address change is followed, a
//! vanished interface is no longer reported, and node addresses / uplinks are read from the
//! node's namespace. Needs root.

mod agent_support;

use std::{collections::BTreeMap, net::IpAddr};

use agent_support::{bridge_pod, ptp_pod};
use anyhow::Result;
use policy_agent::{
    endpoints::{Discovery, HostView, Shape, netlink::Netlink},
    model::ObjectKey,
};
use policy_tests::{netns::NetNs, require_root};

fn pods(list: &[(&str, &str)]) -> BTreeMap<ObjectKey, Vec<IpAddr>> {
    list.iter()
        .map(|(name, ip)| (ObjectKey::new("t", *name), vec![ip.parse().unwrap()]))
        .collect()
}

#[test]
fn discovers_ptp_and_bridge_endpoints() -> Result<()> {
    require_root();
    let node = NetNs::new("dnode")?;
    let other_node = NetNs::new("dnode2")?;
    let ptp = NetNs::new("dptp")?;
    let br = NetNs::new("dbr")?;
    let remote = NetNs::new("dremote")?;
    // Interface names live in the test's own namespaces: fixed names cannot collide.
    ptp_pod(&node, &ptp, "vethptp", "10.251.1.5", "10.251.1.1")?;
    bridge_pod(&node, &br, "cni0", "vethbr", "10.251.2.5/24", "10.251.2.1")?;
    // A pod of another node with the same shape: its veth peer is not in our namespace.
    bridge_pod(
        &other_node,
        &remote,
        "cni0",
        "vethremote",
        "10.251.3.5/24",
        "10.251.3.1",
    )?;
    node.ip(&[
        "link",
        "add",
        "uplink0",
        "type",
        "veth",
        "peer",
        "name",
        "underlay",
        "netns",
        other_node.name(),
    ])?;
    node.ip(&["addr", "add", "192.0.2.10/24", "dev", "uplink0"])?;
    node.ip(&["addr", "add", "2001:db8::10/64", "dev", "uplink0", "nodad"])?;
    node.ip(&["link", "set", "uplink0", "up"])?;
    node.ip(&[
        "route",
        "add",
        "default",
        "via",
        "192.0.2.1",
        "dev",
        "uplink0",
    ])?;

    let ptp_index = node.ifindex("vethptp")?;
    let br_index = node.ifindex("vethbr")?;
    let wanted = pods(&[
        ("ptp", "10.251.1.5"),
        ("br", "10.251.2.5"),
        ("remote", "10.251.3.5"),
        ("nowhere", "10.251.9.9"),
    ]);

    node.run(|| {
        let mut nl = Netlink::new().unwrap();
        let mut discovery = Discovery::with_search(vec!["/run/netns".into()], false).unwrap();
        let view = HostView::read(&mut nl).unwrap();
        let found = discovery.find(&view, &wanted);
        let ptp_host = &found[&ObjectKey::new("t", "ptp")];
        assert_eq!(ptp_host.ifindex, ptp_index);
        assert_eq!(ptp_host.shape, Shape::PointToPoint);
        let br_host = &found[&ObjectKey::new("t", "br")];
        assert_eq!(br_host.ifindex, br_index);
        assert_eq!(br_host.name, "vethbr");
        assert_eq!(br_host.shape, Shape::Bridge);
        assert!(
            !found.contains_key(&ObjectKey::new("t", "remote")),
            "a pod whose veth peer is in another node's namespace is not ours"
        );
        assert!(!found.contains_key(&ObjectKey::new("t", "nowhere")));

        let addrs: Vec<String> = view
            .node_addresses()
            .iter()
            .map(|a| a.to_string())
            .collect();
        for a in ["192.0.2.10", "2001:db8::10", "10.251.1.1", "10.251.2.1"] {
            assert!(addrs.contains(&a.to_string()), "{a} in {addrs:?}");
        }
        assert!(
            !addrs
                .iter()
                .any(|a| a.starts_with("127.") || a.starts_with("fe80"))
        );
        assert_eq!(view.uplinks(), ["uplink0"]);

        // Found again from the cache: same answer.
        assert_eq!(discovery.find(&view, &wanted), found);
    });

    // The bridge pod's address changes; the ptp pod's veth vanishes.
    br.ip(&["addr", "del", "10.251.2.5/24", "dev", "eth0"])?;
    br.ip(&["addr", "add", "10.251.2.6/24", "dev", "eth0"])?;
    node.ip(&["link", "del", "vethptp"])?;
    let wanted = pods(&[("ptp", "10.251.1.5"), ("br", "10.251.2.6")]);
    node.run(|| {
        let mut nl = Netlink::new().unwrap();
        let mut discovery = Discovery::with_search(vec!["/run/netns".into()], false).unwrap();
        let found = discovery.find(&HostView::read(&mut nl).unwrap(), &wanted);
        assert!(
            !found.contains_key(&ObjectKey::new("t", "ptp")),
            "vanished veth"
        );
        assert_eq!(found[&ObjectKey::new("t", "br")].ifindex, br_index);
    });
    Ok(())
}
