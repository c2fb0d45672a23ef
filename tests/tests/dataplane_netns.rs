//! Real sockets across veths between network namespaces, with the programs attached to the host
//! side of each pod's veth in a "node" namespace and the maps written by hand (what the compiler
//! would produce for the policy named in each test).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::Result;
use policy_common::{
    CtKey, Direction, FragKey, Reason, endpoint_flags, identity, map_names, proto,
};
use policy_tests::{
    bpfmap::{PinnedMap, read_pod},
    fixture::{Fixture, policy_entry},
    netns::NetNs,
    packet::{
        ETH_P_8021AD, ETH_P_8021Q, ETH_P_MPLS_UC, PacketSpec, arp_request, mpls, vlan_tagged,
    },
    sockets::{
        Connection, send_frames, tcp_connects, tcp_echo_server, tcp_server, udp_echo, udp_replies,
    },
    topology::{Node, Pod},
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const EGRESS: u32 = endpoint_flags::EGRESS_ISOLATED;
const INGRESS: u32 = endpoint_flags::INGRESS_ISOLATED;

fn pod_ip(node: u8, n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, n)
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// A node with `n` pods, a dataplane whose IPCACHE knows the node address (HOST) and each pod
/// (identity 1000 + i). Pods are attached by the test (flags differ per test).
fn node_with_pods(tag: &str, n: u8) -> Result<(Node, Vec<Pod>, Fixture)> {
    let mut node = Node::new(&format!("{tag}-node"), NODE_IP)?;
    let mut f = Fixture::new(tag)?;
    f.ipcache(&format!("{NODE_IP}/32"), identity::HOST, identity::ANY)?;
    let mut pods = Vec::new();
    for i in 0..n {
        let pod = node.add_pod(&format!("{tag}-p{i}"), pod_ip(1, 10 + i))?;
        f.ipcache(&format!("{}/32", pod.ip), pod_identity(i), identity::ANY)?;
        pods.push(pod);
    }
    Ok((node, pods, f))
}

fn pod_identity(i: u8) -> u32 {
    1000 + u32::from(i)
}

fn pod_id(i: u8) -> u32 {
    1 + u32::from(i)
}

#[test]
fn service_egress_is_judged_on_the_chosen_backend() -> Result<()> {
    let (node, pods, mut f) = node_with_pods("svc", 3)?;
    let [client, allowed, other] = [&pods[0], &pods[1], &pods[2]];
    // The client's egress allows the first backend's pod identity on its target port, and
    // nothing else; the backends are not isolated.
    f.attach_pod(&node, client, pod_id(0), pod_identity(0), EGRESS)?;
    f.attach_pod(&node, allowed, pod_id(1), pod_identity(1), 0)?;
    f.attach_pod(&node, other, pod_id(2), pod_identity(2), 0)?;
    f.allow(
        pod_id(0),
        Direction::Egress,
        pod_identity(1),
        proto::TCP,
        8080,
        11,
    )?;

    // A second node with a remote backend, reached through the uplink.
    let mut remote = Node::new("svc-node2", Ipv4Addr::new(172, 18, 0, 3))?;
    let far = remote.add_pod("svc-far", pod_ip(2, 10))?;
    node.link(&remote, 50, "10.244.1.0/24", "10.244.2.0/24")?;
    f.attach_uplink(&node, "up0")?;
    f.ipcache(&format!("{}/32", far.ip), 2000, identity::ANY)?;
    f.allow(pod_id(0), Direction::Egress, 2000, proto::TCP, 8080, 12)?;

    let vip = |n| Ipv4Addr::new(10, 96, 0, n);
    node.services(&[
        (vip(10), 80, allowed.ip, 8080),
        (vip(11), 80, other.ip, 8080),
        (vip(12), 80, far.ip, 8080),
        (vip(13), 80, far.ip, 9090),
    ])?;
    for n in 10..=13 {
        f.service(&vip(n).to_string())?;
    }
    let _servers = [
        tcp_server(&allowed.ns, at(allowed.ip, 8080))?,
        tcp_server(&other.ns, at(other.ip, 8080))?,
        tcp_server(&far.ns, at(far.ip, 8080))?,
        tcp_server(&far.ns, at(far.ip, 9090))?,
    ];

    // Local backends: decided at the backend's veth.
    assert!(
        tcp_connects(&client.ns, at(vip(10), 80)),
        "service → allowed backend"
    );
    assert!(
        !tcp_connects(&client.ns, at(vip(11), 80)),
        "service → other backend"
    );
    assert!(
        tcp_connects(&client.ns, at(allowed.ip, 8080)),
        "allowed backend directly"
    );
    assert!(
        !tcp_connects(&client.ns, at(other.ip, 8080)),
        "other backend directly"
    );
    // Remote backends: decided on the uplink, on the backend's address and target port.
    assert!(
        tcp_connects(&client.ns, at(vip(12), 80)),
        "service → remote backend"
    );
    assert!(
        !tcp_connects(&client.ns, at(vip(13), 80)),
        "service → remote, wrong port"
    );

    let counters = f.counters()?;
    assert!(counters[&Reason::DeferredService] > 0);
    assert!(counters[&Reason::DroppedPolicy] > 0);
    Ok(())
}

#[test]
fn replies_cross_a_denied_reverse_direction() -> Result<()> {
    let (node, pods, mut f) = node_with_pods("reply", 2)?;
    let [client, server] = [&pods[0], &pods[1]];
    // The server may send nothing on its own (egress isolated, no rules); the client may
    // reach it. Neither side allows anything towards the client.
    f.attach_pod(&node, client, pod_id(0), pod_identity(0), EGRESS | INGRESS)?;
    f.attach_pod(&node, server, pod_id(1), pod_identity(1), EGRESS)?;
    f.allow(
        pod_id(0),
        Direction::Egress,
        pod_identity(1),
        proto::TCP,
        8080,
        21,
    )?;
    f.allow(
        pod_id(0),
        Direction::Egress,
        pod_identity(1),
        proto::UDP,
        5353,
        22,
    )?;
    let _servers = [
        tcp_server(&server.ns, at(server.ip, 8080))?,
        udp_echo(&server.ns, at(server.ip, 5353))?,
        tcp_server(&client.ns, at(client.ip, 7070))?,
    ];
    assert!(tcp_connects(&client.ns, at(server.ip, 8080)), "TCP reply");
    assert!(udp_replies(&client.ns, at(server.ip, 5353)), "UDP reply");
    assert!(
        !tcp_connects(&server.ns, at(client.ip, 7070)),
        "server-initiated"
    );
    let counters = f.counters()?;
    assert!(counters[&Reason::AllowedReply] > 0);
    assert!(counters[&Reason::DroppedPolicy] > 0);
    Ok(())
}

#[test]
fn the_node_reaches_an_ingress_isolated_pod() -> Result<()> {
    let (node, pods, mut f) = node_with_pods("host", 2)?;
    let [other, isolated] = [&pods[0], &pods[1]];
    f.attach_pod(&node, other, pod_id(0), pod_identity(0), 0)?;
    f.attach_pod(&node, isolated, pod_id(1), pod_identity(1), INGRESS)?;
    let _server = tcp_server(&isolated.ns, at(isolated.ip, 8080))?;
    assert!(tcp_connects(&node.ns, at(isolated.ip, 8080)), "node → pod");
    assert!(!tcp_connects(&other.ns, at(isolated.ip, 8080)), "pod → pod");
    let counters = f.counters()?;
    assert!(counters[&Reason::AllowedHost] > 0);
    assert!(counters[&Reason::DroppedPolicy] > 0);
    Ok(())
}

#[test]
fn ip_block_with_except_applies_to_pod_addresses() -> Result<()> {
    let (node, pods, mut f) = node_with_pods("ipblock", 3)?;
    let [client, inside, excepted] = [&pods[0], &pods[1], &pods[2]];
    // egress: to: [ipBlock: {cidr: 10.244.0.0/16, except: [<excepted>/32]}], ports: TCP 8080.
    // The CIDR identity is carried by the range and by every pod /32 inside it, except the
    // carved-out one.
    let cidr_identity = identity::CIDR_MIN + 5;
    f.ipcache("10.244.0.0/16", identity::WORLD, cidr_identity)?;
    f.ipcache(&format!("{}/32", inside.ip), pod_identity(1), cidr_identity)?;
    f.ipcache(
        &format!("{}/32", excepted.ip),
        pod_identity(2),
        identity::ANY,
    )?;
    f.attach_pod(&node, client, pod_id(0), pod_identity(0), EGRESS)?;
    f.attach_pod(&node, inside, pod_id(1), pod_identity(1), 0)?;
    f.attach_pod(&node, excepted, pod_id(2), pod_identity(2), 0)?;
    f.allow(
        pod_id(0),
        Direction::Egress,
        cidr_identity,
        proto::TCP,
        8080,
        31,
    )?;
    let _servers = [
        tcp_server(&inside.ns, at(inside.ip, 8080))?,
        tcp_server(&excepted.ns, at(excepted.ip, 8080))?,
    ];
    assert!(
        tcp_connects(&client.ns, at(inside.ip, 8080)),
        "pod inside the block"
    );
    assert!(
        !tcp_connects(&client.ns, at(excepted.ip, 8080)),
        "pod in `except`"
    );
    assert!(f.counters()?[&Reason::DroppedPolicy] > 0);
    Ok(())
}

#[test]
fn end_port_ranges_bound_the_allowed_ports() -> Result<()> {
    let (node, pods, mut f) = node_with_pods("endport", 2)?;
    let [client, server] = [&pods[0], &pods[1]];
    f.attach_pod(&node, client, pod_id(0), pod_identity(0), EGRESS)?;
    f.attach_pod(&node, server, pod_id(1), pod_identity(1), 0)?;
    // ports: [{protocol: TCP, port: 8000, endPort: 8099}]
    f.allow_range(
        pod_id(0),
        Direction::Egress,
        pod_identity(1),
        proto::TCP,
        (8000, 8099),
        41,
    )?;
    let ports = [7999u16, 8000, 8050, 8099, 8100];
    let _servers = ports
        .iter()
        .map(|&p| tcp_server(&server.ns, at(server.ip, p)))
        .collect::<Result<Vec<_>>>()?;
    for port in ports {
        let expected = (8000..=8099).contains(&port);
        assert_eq!(
            tcp_connects(&client.ns, at(server.ip, port)),
            expected,
            "port {port}"
        );
    }
    assert!(f.counters()?[&Reason::DroppedPolicy] > 0);
    Ok(())
}

#[test]
fn a_named_port_resolves_per_destination_pod() -> Result<()> {
    let (node, pods, mut f) = node_with_pods("named", 3)?;
    let [client, web1, web2] = [&pods[0], &pods[1], &pods[2]];
    // ingress: from: [podSelector: client], ports: [{port: http}], where containerPort
    // "http" is 8080 on web1 and 9090 on web2: one entry per destination pod.
    f.attach_pod(&node, client, pod_id(0), pod_identity(0), 0)?;
    f.attach_pod(&node, web1, pod_id(1), pod_identity(1), INGRESS)?;
    f.attach_pod(&node, web2, pod_id(2), pod_identity(2), INGRESS)?;
    f.allow(
        pod_id(1),
        Direction::Ingress,
        pod_identity(0),
        proto::TCP,
        8080,
        51,
    )?;
    f.allow(
        pod_id(2),
        Direction::Ingress,
        pod_identity(0),
        proto::TCP,
        9090,
        52,
    )?;
    let _servers = [
        tcp_server(&web1.ns, at(web1.ip, 8080))?,
        tcp_server(&web1.ns, at(web1.ip, 9090))?,
        tcp_server(&web2.ns, at(web2.ip, 8080))?,
        tcp_server(&web2.ns, at(web2.ip, 9090))?,
    ];
    assert!(
        tcp_connects(&client.ns, at(web1.ip, 8080)),
        "web1 http (8080)"
    );
    assert!(!tcp_connects(&client.ns, at(web1.ip, 9090)), "web1 9090");
    assert!(
        tcp_connects(&client.ns, at(web2.ip, 9090)),
        "web2 http (9090)"
    );
    assert!(!tcp_connects(&client.ns, at(web2.ip, 8080)), "web2 8080");
    assert!(f.counters()?[&Reason::DroppedPolicy] > 0);
    Ok(())
}

/// CONNTRACK and FRAGMENTS entries of endpoint `id`, walked in the pinned maps with raw bpf(2)
/// calls (not through the dataplane's own code).
fn flows_of(f: &Fixture, id: u32) -> Result<(usize, usize)> {
    let maps = f.dp.pin_dir().join("maps");
    let ct = PinnedMap::open(&maps.join(map_names::CONNTRACK))?
        .keys()?
        .iter()
        .map(|k| read_pod::<CtKey>(k))
        .collect::<Result<Vec<_>>>()?;
    let frags = PinnedMap::open(&maps.join(map_names::FRAGMENTS))?
        .keys()?
        .iter()
        .map(|k| read_pod::<FragKey>(k))
        .collect::<Result<Vec<_>>>()?;
    Ok((
        ct.iter().filter(|k| k.endpoint == id).count(),
        frags.iter().filter(|k| k.endpoint == id).count(),
    ))
}

#[test]
fn a_removed_endpoint_takes_its_flows_and_a_reused_id_inherits_none() -> Result<()> {
    let (node, pods, mut f) = node_with_pods("ctgone", 2)?;
    let [client, server] = [&pods[0], &pods[1]];
    let (client_id, server_id) = (pod_id(0), pod_id(1));
    f.attach_pod(&node, client, client_id, pod_identity(0), 0)?;
    f.attach_pod(&node, server, server_id, pod_identity(1), INGRESS)?;
    // ingress: from the client, TCP 8080 and UDP 9000.
    let allowed = [(proto::TCP, 8080), (proto::UDP, 9000)];
    for (protocol, port) in allowed {
        f.allow(
            server_id,
            Direction::Ingress,
            pod_identity(0),
            protocol,
            port,
            51,
        )?;
    }
    let _echo = tcp_echo_server(&server.ns, at(server.ip, 8080))?;
    let mut conn = Connection::open(&client.ns, at(server.ip, 8080))?;
    assert!(conn.round_trip(b"established"), "the allowed flow works");
    // A datagram over the MTU leaves in fragments: the first one's verdict is recorded.
    client.ns.run(|| -> Result<()> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.send_to(&[7u8; 4000], at(server.ip, 9000))?;
        Ok(())
    })?;
    let (flows, fragments) = flows_of(&f, server_id)?;
    assert!(flows >= 1, "the server's conntrack entry exists");
    assert!(fragments >= 1, "the server's fragment verdict exists");
    let (client_flows, _) = flows_of(&f, client_id)?;
    assert!(client_flows >= 1);

    // The pod goes: detached, endpoint removed. Its flows go with it, nobody else's.
    node.ns.run(|| f.dp.detach(&server.host_if))?;
    f.dp.remove_endpoint(server.ifindex)?;
    assert_eq!(
        flows_of(&f, server_id)?,
        (0, 0),
        "no entry outlives the endpoint"
    );
    assert_eq!(flows_of(&f, client_id)?.0, client_flows);

    // A new pod on the same veth, address and id, isolated with nothing allowed.
    for (protocol, port) in allowed {
        f.revoke(policy_entry(
            server_id,
            Direction::Ingress,
            pod_identity(0),
            protocol,
            port,
            port,
        ))?;
    }
    f.attach_pod(&node, server, server_id, pod_identity(1), INGRESS)?;
    let before = f.counters()?;
    assert!(
        !conn.round_trip(b"inherited?"),
        "the old flow's packet is dropped"
    );
    let after = f.counters()?;
    let moved = |r: Reason| after[&r] - before[&r];
    // Judged as a new flow and denied, not found established (and then revoked).
    assert!(moved(Reason::DroppedPolicy) > 0, "{before:?} → {after:?}");
    assert_eq!(moved(Reason::DroppedRevoked), 0, "{before:?} → {after:?}");
    assert_eq!(
        flows_of(&f, server_id)?.0,
        0,
        "a denied flow makes no entry"
    );
    Ok(())
}

/// Sends `frames` out of `ifname` in `ns` (raw, through a packet socket), waits for `reason`
/// to have counted `expected` of them, and returns how the per-reason counters moved.
fn send_raw(
    f: &Fixture,
    ns: &NetNs,
    ifname: &str,
    frames: &[Vec<u8>],
    reason: Reason,
    expected: u64,
) -> Result<BTreeMap<Reason, u64>> {
    let before = f.counters()?;
    send_frames(ns, ifname, frames)?;
    let moved = || -> Result<BTreeMap<Reason, u64>> {
        Ok(f.counters()?
            .iter()
            .map(|(r, v)| (*r, v - before[r]))
            .filter(|(_, v)| *v > 0)
            .collect())
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while moved()?.get(&reason).copied().unwrap_or(0) < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Time for anything else the frames would make the programs count.
    std::thread::sleep(Duration::from_millis(200));
    moved()
}

/// Frames that are not IP, sent raw across real veths: an 802.1Q-tagged and an 802.1ad +
/// 802.1Q-tagged UDP datagram, an MPLS-labelled one, and an ARP request, from each pod out of
/// its `eth0` (the host veth's tc ingress: `from_pod`) and from the node out of each host veth
/// (tc egress: `to_pod`). A tag that arrives in a frame's data is taken out of it by the kernel
/// before tc ingress (the programs find it in `skb->vlan_tci`, the inner ethertype at the
/// Ethernet header): what BPF_PROG_TEST_RUN cannot show. The datagrams inside would be allowed.
/// The isolated pod (both directions) drops every one as not IP, not judging what is inside;
/// the pod that is not isolated passes them unpoliced; ARP passes both.
#[test]
fn non_ip_frames_drop_at_an_isolated_pod() -> Result<()> {
    let (node, pods, mut f) = node_with_pods("notip", 2)?;
    let [isolated, open] = [&pods[0], &pods[1]];
    f.attach_pod(
        &node,
        isolated,
        pod_id(0),
        pod_identity(0),
        EGRESS | INGRESS,
    )?;
    f.attach_pod(&node, open, pod_id(1), pod_identity(1), 0)?;
    // UDP 5000 to and from the other pod is allowed.
    for direction in [Direction::Egress, Direction::Ingress] {
        f.allow(pod_id(0), direction, pod_identity(1), proto::UDP, 5000, 50)?;
    }
    let udp = |src: &Pod, dst: &Pod| {
        PacketSpec::udp(&src.ip.to_string(), 40000, &dst.ip.to_string(), 5000).build()
    };
    let wrapped = |inner: Vec<u8>| {
        vec![
            vlan_tagged(&inner, ETH_P_8021Q, 100),
            vlan_tagged(&vlan_tagged(&inner, ETH_P_8021Q, 100), ETH_P_8021AD, 200),
            mpls(&inner, ETH_P_MPLS_UC, 1000),
        ]
    };
    let arp = arp_request(isolated.ip, Ipv4Addr::new(10, 244, 1, 200));
    // Other counts may move meanwhile only by neighbour discovery (ICMPv6, not policed).
    let others = |moved: &BTreeMap<Reason, u64>, reason: Reason| -> Vec<Reason> {
        moved
            .keys()
            .copied()
            .filter(|r| *r != reason && *r != Reason::AllowedNotPoliced)
            .collect()
    };
    // (the isolated pod's, sent in, out of, frames)
    for (at_isolated, ns, ifname, frames) in [
        (true, &isolated.ns, "eth0", wrapped(udp(isolated, open))),
        (
            true,
            &node.ns,
            isolated.host_if.as_str(),
            wrapped(udp(open, isolated)),
        ),
        (false, &open.ns, "eth0", wrapped(udp(open, isolated))),
        (
            false,
            &node.ns,
            open.host_if.as_str(),
            wrapped(udp(isolated, open)),
        ),
    ] {
        let n = frames.len() as u64;
        let what = format!("{} frames out of {ifname} in {}", n, ns.name());
        if at_isolated {
            let moved = send_raw(&f, ns, ifname, &frames, Reason::DroppedNotIp, n)?;
            assert_eq!(
                moved.get(&Reason::DroppedNotIp),
                Some(&n),
                "{what}: {moved:?}"
            );
            assert_eq!(
                others(&moved, Reason::DroppedNotIp),
                [],
                "{what}: {moved:?}"
            );
        } else {
            let moved = send_raw(&f, ns, ifname, &frames, Reason::AllowedNotPoliced, n)?;
            assert!(
                moved.get(&Reason::AllowedNotPoliced) >= Some(&n),
                "{what}: {moved:?}"
            );
            assert_eq!(
                others(&moved, Reason::AllowedNotPoliced),
                [],
                "{what}: {moved:?}"
            );
        }
    }
    // ARP from and to the isolated pod passes.
    for (ns, ifname) in [
        (&isolated.ns, "eth0"),
        (&node.ns, isolated.host_if.as_str()),
    ] {
        let moved = send_raw(
            &f,
            ns,
            ifname,
            std::slice::from_ref(&arp),
            Reason::AllowedNotPoliced,
            1,
        )?;
        assert!(moved.contains_key(&Reason::AllowedNotPoliced), "{moved:?}");
        assert_eq!(
            others(&moved, Reason::AllowedNotPoliced),
            [],
            "ARP: {moved:?}"
        );
    }
    Ok(())
}
