//! BPF_PROG_TEST_RUN on hand-built packets, one test per branch of the fast path.
//!
//! Every check asserts both the tc action and exactly which per-reason counters moved, so a test
//! fails if the right action is reached through the wrong path. The endpoint under test sits on
//! the loopback ifindex (what test runs see); POLICY, IPCACHE and SERVICES entries are written by
//! hand through the map writer.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use policy_common::{
    Config, Direction, EndpointInfo, EndpointSlot, Reason, ct_flags, endpoint_flags, identity,
    map_names,
    program_names::{FROM_POD, TO_NETWORK, TO_POD},
    proto,
};
use policy_tests::{
    bpfmap::{PinnedMap, read_pod},
    fixture::{Fixture, policy_entry},
    packet::{
        ETH_P_8021AD, ETH_P_8021Q, ETH_P_MPLS_MC, ETH_P_MPLS_UC, EXT_DSTOPTS, EXT_HOPOPTS,
        EXT_ROUTING, PacketSpec, TCP_ACK, TCP_FIN, TCP_SYN, arp_request, mpls, pppoe_session,
        vlan_tagged,
    },
    testrun::{TC_ACT_UNSPEC, TEST_IFINDEX},
};

use Reason::*;

const EP: u32 = 10;
const EP_IDENTITY: u32 = 1000;
const PEER: u32 = 2000;
const OTHER: u32 = 2001;
const CIDR_ID: u32 = identity::CIDR_MIN + 1;
const BOTH: u32 = endpoint_flags::INGRESS_ISOLATED | endpoint_flags::EGRESS_ISOLATED;
const MARK_SHIFT: u32 = policy_common::DEFAULT_MARK_SHIFT;

/// Addresses of one family.
#[derive(Clone, Copy)]
struct Addrs {
    me: &'static str,
    peer: &'static str,
    other: &'static str,
    /// Inside `cidr`, no pod.
    world: &'static str,
    /// Outside every entry.
    far: &'static str,
    cidr: &'static str,
    host: &'static str,
    service: &'static str,
    host_bits: u8,
}

const V4: Addrs = Addrs {
    me: "10.0.0.10",
    peer: "10.0.1.2",
    other: "10.0.1.3",
    world: "192.0.2.10",
    far: "198.51.100.1",
    cidr: "192.0.2.0/24",
    host: "172.18.0.2",
    service: "10.96.0.10",
    host_bits: 32,
};

const V6: Addrs = Addrs {
    me: "fd00::10",
    peer: "fd00::1:2",
    other: "fd00::1:3",
    world: "2001:db8::10",
    far: "2001:db8:1::1",
    cidr: "2001:db8::/64",
    host: "fc00::2",
    service: "fd00:96::10",
    host_bits: 128,
};

/// (allowed egress port, allowed ingress port, denied port) per protocol.
fn ports(protocol: u8) -> (u16, u16, u16) {
    match protocol {
        proto::TCP => (80, 8080, 81),
        proto::UDP => (53, 5353, 54),
        _ => (9000, 7000, 9001),
    }
}

fn host(a: &Addrs, addr: &str) -> String {
    format!("{addr}/{}", a.host_bits)
}

/// The endpoint (both directions isolated) and its peers; PEER may reach the allowed ingress
/// port of every protocol and be reached on the allowed egress port.
fn world(tag: &str, a: &Addrs) -> Result<Fixture> {
    let mut f = Fixture::new(tag)?;
    f.endpoint(TEST_IFINDEX, EP, EP_IDENTITY, BOTH)?;
    f.ipcache(&host(a, a.me), EP_IDENTITY, identity::ANY)?;
    f.ipcache(&host(a, a.peer), PEER, identity::ANY)?;
    f.ipcache(&host(a, a.other), OTHER, identity::ANY)?;
    f.ipcache(&host(a, a.host), identity::HOST, identity::ANY)?;
    f.ipcache(a.cidr, identity::WORLD, CIDR_ID)?;
    for protocol in [proto::TCP, proto::UDP, proto::SCTP] {
        let (egress, ingress, _) = ports(protocol);
        f.allow(
            EP,
            Direction::Egress,
            PEER,
            protocol,
            egress,
            100 + protocol as u32,
        )?;
        f.allow(
            EP,
            Direction::Ingress,
            PEER,
            protocol,
            ingress,
            200 + protocol as u32,
        )?;
    }
    Ok(f)
}

/// A TCP SYN without ACK opens a flow: policy judges it, conntrack is not consulted. A
/// retransmitted SYN is allowed by policy again, and a SYN that reuses an allowed flow's tuple in
/// the reverse direction is no reply of that flow: the endpoint's ingress policy drops it, while
/// the flow's real reply still passes.
#[test]
fn a_tcp_syn_is_judged_as_a_new_flow() -> Result<()> {
    for a in [V4, V6] {
        let f = world("syn", &a)?;
        let (egress, _, _) = ports(proto::TCP);
        let out = PacketSpec::tcp(a.me, 40000, a.peer, egress);
        let steps = [
            (FROM_POD, out.clone(), AllowedByPolicy),
            // Retransmitted: judged again.
            (FROM_POD, out.clone(), AllowedByPolicy),
            (FROM_POD, out.clone().flags(TCP_ACK), AllowedEstablished),
            // The peer opening a connection from port 80 to port 40000: no rule lets it in.
            (TO_POD, out.reply().flags(TCP_SYN), DroppedPolicy),
            (TO_POD, out.reply(), AllowedReply),
        ];
        for (program, spec, reason) in steps {
            f.expect(program, &spec, 0, &[reason])?;
        }
    }
    Ok(())
}

/// allowed, denied, reply, fragment and truncated for one family and protocol.
fn matrix(tag: &str, a: &Addrs, protocol: u8) -> Result<()> {
    let f = world(tag, a)?;
    let (egress, ingress, denied) = ports(protocol);
    let spec =
        |src: &str, sport, dst: &str, dport| PacketSpec::new(protocol, src, sport, dst, dport);

    // Allowed: a new egress flow by identity, then its later packets.
    let out = spec(a.me, 40000, a.peer, egress);
    f.expect(FROM_POD, &out, 0, &[AllowedByPolicy])?;
    f.expect(
        FROM_POD,
        &out.clone().flags(TCP_ACK),
        0,
        &[AllowedEstablished],
    )?;
    // Reply: crosses the isolated ingress although no ingress rule allows port 40000...
    f.expect(TO_POD, &out.reply(), 0, &[AllowedReply])?;
    // ...which a packet of no known flow cannot.
    f.expect(
        TO_POD,
        &spec(a.peer, egress, a.me, 40001),
        0,
        &[DroppedPolicy],
    )?;
    // Denied: no rule for the port, or for the peer.
    f.expect(
        FROM_POD,
        &spec(a.me, 40002, a.peer, denied),
        0,
        &[DroppedPolicy],
    )?;
    f.expect(
        FROM_POD,
        &spec(a.me, 40002, a.other, egress),
        0,
        &[DroppedPolicy],
    )?;
    f.expect(
        FROM_POD,
        &spec(a.me, 40002, a.far, egress),
        0,
        &[DroppedPolicy],
    )?;

    // The ingress side: allowed, its reply through the isolated egress, denied peers.
    let inbound = spec(a.peer, 50000, a.me, ingress);
    f.expect(TO_POD, &inbound, 0, &[AllowedByPolicy])?;
    f.expect(FROM_POD, &inbound.reply(), 0, &[AllowedReply])?;
    f.expect(
        TO_POD,
        &spec(a.other, 50001, a.me, ingress),
        0,
        &[DroppedPolicy],
    )?;
    f.expect(
        TO_POD,
        &spec(a.peer, 50001, a.me, denied),
        0,
        &[DroppedPolicy],
    )?;

    // Fragments: the first is judged, later ones follow it (same hook only).
    let first = spec(a.me, 40003, a.peer, egress).fragment(0, true, 77);
    f.expect(FROM_POD, &first, 0, &[AllowedByPolicy])?;
    let later = |id| spec(a.me, 40003, a.peer, egress).fragment(8, false, id);
    f.expect(FROM_POD, &later(77), 0, &[AllowedFragment])?;
    f.expect(FROM_POD, &later(78), 0, &[DroppedFragment])?;
    f.expect(TO_POD, &later(77), 0, &[DroppedFragment])?;
    let first_denied = spec(a.me, 40004, a.peer, denied).fragment(0, true, 79);
    f.expect(FROM_POD, &first_denied, 0, &[DroppedPolicy])?;
    let later_denied = spec(a.me, 40004, a.peer, denied).fragment(8, false, 79);
    f.expect(FROM_POD, &later_denied, 0, &[DroppedFragment])?;

    // Truncated: inside the L4 header; inside IPv4 options or an IPv6 extension header (the
    // kernel's test run refuses packets shorter than the fixed IP header itself).
    let bytes = spec(a.me, 40005, a.peer, egress).build();
    let l4 = spec(a.me, 40005, a.peer, egress).l4_offset();
    f.expect_bytes(FROM_POD, &bytes[..l4 + 3], 0, &[DroppedTruncated])?;
    f.expect_bytes(TO_POD, &bytes[..l4 + 1], 0, &[DroppedTruncated])?;
    let (with_ip_extras, cut) = if a.host_bits == 32 {
        (
            spec(a.me, 40005, a.peer, egress).ipv4_options(8),
            14 + 20 + 4,
        )
    } else {
        (
            spec(a.me, 40005, a.peer, egress).ipv6_ext(&[EXT_HOPOPTS]),
            14 + 40 + 1,
        )
    };
    f.expect_bytes(
        FROM_POD,
        &with_ip_extras.build()[..cut],
        0,
        &[DroppedTruncated],
    )?;
    // A first fragment too short for the ports is truncated, not judged on garbage.
    let mut tiny = spec(a.me, 40006, a.peer, egress).fragment(0, true, 80);
    tiny.payload = 0;
    let tiny = tiny.build();
    f.expect_bytes(FROM_POD, &tiny[..l4 + 2], 0, &[DroppedTruncated])?;
    Ok(())
}

macro_rules! matrix_tests {
    ($($name:ident: $addrs:expr, $proto:expr;)*) => {$(
        #[test]
        fn $name() -> Result<()> {
            matrix(stringify!($name), &$addrs, $proto)
        }
    )*};
}

matrix_tests! {
    v4_tcp: V4, proto::TCP;
    v4_udp: V4, proto::UDP;
    v4_sctp: V4, proto::SCTP;
    v6_tcp: V6, proto::TCP;
    v6_udp: V6, proto::UDP;
    v6_sctp: V6, proto::SCTP;
}

#[test]
fn ipv4_options_are_skipped() -> Result<()> {
    let f = world("v4opts", &V4)?;
    let allowed = PacketSpec::tcp(V4.me, 40000, V4.peer, 80).ipv4_options(12);
    f.expect(FROM_POD, &allowed, 0, &[AllowedByPolicy])?;
    let denied = PacketSpec::tcp(V4.me, 40001, V4.peer, 81).ipv4_options(40);
    f.expect(FROM_POD, &denied, 0, &[DroppedPolicy])?;
    // Options claimed by IHL but missing from the packet.
    let bytes = allowed.build();
    f.expect_bytes(FROM_POD, &bytes[..14 + 24], 0, &[DroppedTruncated])?;
    Ok(())
}

#[test]
fn ipv6_extension_headers_are_walked_to_the_bound() -> Result<()> {
    let f = world("v6ext", &V6)?;
    let three = PacketSpec::tcp(V6.me, 40000, V6.peer, 80).ipv6_ext(&[
        EXT_HOPOPTS,
        EXT_DSTOPTS,
        EXT_ROUTING,
    ]);
    f.expect(FROM_POD, &three, 0, &[AllowedByPolicy])?;
    let denied = PacketSpec::tcp(V6.me, 40001, V6.peer, 81).ipv6_ext(&[EXT_HOPOPTS]);
    f.expect(FROM_POD, &denied, 0, &[DroppedPolicy])?;
    // Six headers (the bound) still parse; seven are malformed.
    let six = PacketSpec::tcp(V6.me, 40002, V6.peer, 80).ipv6_ext(&[EXT_DSTOPTS; 6]);
    f.expect(FROM_POD, &six, 0, &[AllowedByPolicy])?;
    let seven = PacketSpec::tcp(V6.me, 40003, V6.peer, 80).ipv6_ext(&[EXT_DSTOPTS; 7]);
    f.expect(FROM_POD, &seven, 0, &[DroppedMalformed])?;
    // Extension headers plus a fragment header: the first fragment is judged.
    let frag = PacketSpec::udp(V6.me, 40004, V6.peer, 53)
        .ipv6_ext(&[EXT_HOPOPTS])
        .fragment(0, true, 5);
    f.expect(FROM_POD, &frag, 0, &[AllowedByPolicy])?;
    Ok(())
}

#[test]
fn malformed_headers_are_dropped() -> Result<()> {
    let f = world("malformed", &V4)?;
    let good = PacketSpec::tcp(V4.me, 40000, V4.peer, 80).build();

    let mut ihl4 = good.clone();
    ihl4[14] = 0x44;
    f.expect_bytes(FROM_POD, &ihl4, 0, &[DroppedMalformed])?;

    let mut version = good.clone();
    version[14] = 0x65;
    f.expect_bytes(FROM_POD, &version, 0, &[DroppedMalformed])?;

    let mut short_total = good.clone();
    short_total[16..18].copy_from_slice(&12u16.to_be_bytes());
    f.expect_bytes(FROM_POD, &short_total, 0, &[DroppedMalformed])?;

    // RFC 1858: a TCP fragment at offset 8 bytes could rewrite the first fragment's flags.
    let overlap = PacketSpec::tcp(V4.me, 40000, V4.peer, 80).fragment(1, false, 9);
    f.expect(FROM_POD, &overlap, 0, &[DroppedMalformed])?;

    let v6 = world("malformed6", &V6)?;
    let mut v6_version = PacketSpec::tcp(V6.me, 40000, V6.peer, 80).build();
    v6_version[14] = 0x40;
    v6.expect_bytes(FROM_POD, &v6_version, 0, &[DroppedMalformed])?;
    Ok(())
}

#[test]
fn icmp_arp_and_other_protocols_are_not_policed() -> Result<()> {
    let f = world("notpoliced", &V4)?;
    let icmp = PacketSpec::new(proto::ICMP, V4.far, 0, V4.me, 0);
    f.expect(TO_POD, &icmp, 0, &[AllowedNotPoliced])?;
    f.expect(FROM_POD, &icmp.reply(), 0, &[AllowedNotPoliced])?;
    let icmp6 = PacketSpec::new(proto::ICMPV6, V6.far, 0, V6.me, 0);
    f.expect(TO_POD, &icmp6, 0, &[AllowedNotPoliced])?;
    let gre = PacketSpec::new(47, V4.far, 0, V4.me, 0);
    f.expect(TO_POD, &gre, 0, &[AllowedNotPoliced])?;
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0; 20]);
    f.expect_bytes(TO_POD, &arp, 0, &[AllowedNotPoliced])?;
    Ok(())
}

/// Frames of other ethertypes around `inner` (a packet the policy would allow): 802.1Q and
/// 802.1ad VLAN tags, MPLS unicast and multicast, a PPPoE session, and an unknown ethertype.
fn non_ip_frames(inner: &PacketSpec) -> Vec<(&'static str, Vec<u8>)> {
    let bytes = inner.build();
    let mut unknown = bytes.clone();
    unknown[12..14].copy_from_slice(&0x88b5u16.to_be_bytes()); // IEEE local experimental
    vec![
        ("802.1Q", vlan_tagged(&bytes, ETH_P_8021Q, 100)),
        ("802.1ad", vlan_tagged(&bytes, ETH_P_8021AD, 200)),
        (
            "802.1ad + 802.1Q",
            vlan_tagged(&vlan_tagged(&bytes, ETH_P_8021Q, 100), ETH_P_8021AD, 200),
        ),
        ("MPLS", mpls(&bytes, ETH_P_MPLS_UC, 1000)),
        ("MPLS multicast", mpls(&bytes, ETH_P_MPLS_MC, 1001)),
        ("PPPoE", pppoe_session(&bytes, 7)),
        ("0x88b5", unknown),
    ]
}

/// Runs every non-IP frame around `inner` through `program` with `mark`, expecting `reason`
/// for each.
fn expect_non_ip(
    f: &Fixture,
    program: &'static str,
    inner: &PacketSpec,
    mark: u32,
    reasons: &[Reason],
) -> Result<()> {
    for (name, frame) in non_ip_frames(inner) {
        f.expect_bytes(program, &frame, mark, reasons)
            .with_context(|| format!("{name} frame at {program}"))?;
    }
    Ok(())
}

#[test]
fn non_ip_frames_drop_in_isolated_directions_only() -> Result<()> {
    for a in [V4, V6] {
        let mut f = world("notip", &a)?;
        let (egress, ingress, _) = ports(proto::UDP);
        // What the policy allows, were it judged as IP: nothing inside the frames is.
        let out = PacketSpec::udp(a.me, 40000, a.peer, egress);
        let inbound = PacketSpec::udp(a.peer, 40001, a.me, ingress);
        let arp = arp_request(Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 1));
        // Unwrapped, the same packets are allowed by policy: the drops below are the wrapping's.
        f.expect(FROM_POD, &out, 0, &[AllowedByPolicy])?;
        f.expect(TO_POD, &inbound, 0, &[AllowedByPolicy])?;
        for (flags, egress_isolated, ingress_isolated) in [
            (BOTH, true, true),
            (endpoint_flags::EGRESS_ISOLATED, true, false),
            (endpoint_flags::INGRESS_ISOLATED, false, true),
            (0, false, false),
            // Not programmed changes nothing: these frames are no flows.
            (endpoint_flags::NOT_PROGRAMMED | BOTH, true, true),
            (endpoint_flags::NOT_PROGRAMMED, false, false),
        ] {
            f.endpoint(TEST_IFINDEX, EP, EP_IDENTITY, flags)?;
            let verdict = |isolated| {
                if isolated {
                    DroppedNotIp
                } else {
                    AllowedNotPoliced
                }
            };
            expect_non_ip(&f, FROM_POD, &out, 0, &[verdict(egress_isolated)])
                .with_context(|| format!("flags {flags:#x}"))?;
            expect_non_ip(&f, TO_POD, &inbound, 0, &[verdict(ingress_isolated)])
                .with_context(|| format!("flags {flags:#x}"))?;
            // ARP passes whatever the isolation, and so do ICMP and ICMPv6.
            f.expect_bytes(FROM_POD, &arp, 0, &[AllowedNotPoliced])?;
            f.expect_bytes(TO_POD, &arp, 0, &[AllowedNotPoliced])?;
            let icmp = PacketSpec::new(proto::ICMP, V4.far, 0, V4.me, 0);
            f.expect(TO_POD, &icmp, 0, &[AllowedNotPoliced])?;
            f.expect(FROM_POD, &icmp.reply(), 0, &[AllowedNotPoliced])?;
            let icmp6 = PacketSpec::new(proto::ICMPV6, V6.far, 0, V6.me, 0);
            f.expect(TO_POD, &icmp6, 0, &[AllowedNotPoliced])?;
            f.expect(FROM_POD, &icmp6.reply(), 0, &[AllowedNotPoliced])?;
        }
        // On the uplink, unmarked frames are not ours to judge (they go on uncounted); a marked
        // one carries a deferred egress decision, which only egress-isolated endpoints make: not
        // IP, it drops.
        let mark = EP << MARK_SHIFT;
        expect_non_ip(&f, TO_NETWORK, &out, 0, &[])?;
        expect_non_ip(&f, TO_NETWORK, &out, mark, &[DroppedNotIp])?;
        f.expect_bytes(TO_NETWORK, &arp, mark, &[AllowedNotPoliced])?;
    }
    Ok(())
}

#[test]
fn non_ip_frames_without_an_endpoint_fail_closed() -> Result<()> {
    let f = Fixture::new("notip-noep")?;
    let out = PacketSpec::udp(V4.me, 40000, V4.peer, 53);
    expect_non_ip(&f, FROM_POD, &out, 0, &[DroppedEndpointNotProgrammed])?;
    expect_non_ip(&f, TO_POD, &out.reply(), 0, &[DroppedEndpointNotProgrammed])?;
    let arp = arp_request(Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 1));
    f.expect_bytes(FROM_POD, &arp, 0, &[AllowedNotPoliced])?;
    f.expect_bytes(TO_POD, &arp, 0, &[AllowedNotPoliced])?;
    Ok(())
}

#[test]
fn non_ip_drops_are_reported_as_events() -> Result<()> {
    policy_tests::pin_to_cpu(0)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let _guard = runtime.enter();
    let mut f = world("notip-events", &V4)?;
    f.endpoint(
        TEST_IFINDEX,
        EP,
        EP_IDENTITY,
        endpoint_flags::EGRESS_ISOLATED,
    )?;
    let mut reader = f.dp.events()?;
    let out = PacketSpec::udp(V4.me, 40000, V4.peer, 53);
    let tagged = vlan_tagged(&out.build(), ETH_P_8021Q, 100);
    f.expect_bytes(FROM_POD, &tagged, 0, &[DroppedNotIp])?;
    // Not isolated: passes, and passing unpoliced is no event.
    f.expect_bytes(TO_POD, &tagged, 0, &[AllowedNotPoliced])?;
    let mut events = Vec::new();
    reader.try_read(&mut events);
    assert_eq!(events.len(), 1, "{events:?}");
    let ev = events[0];
    assert_eq!(ev.reason, DroppedNotIp as u32);
    assert_eq!(ev.endpoint, EP);
    assert_eq!(ev.ifindex, TEST_IFINDEX);
    assert_eq!(ev.direction, Direction::Egress as u8);
    // Nothing behind the tag was parsed.
    assert_eq!((ev.family, ev.protocol, ev.sport, ev.dport), (0, 0, 0, 0));
    Ok(())
}

/// The pod of the IPv4-mapped tests: at 10.244.1.5, admitted as a pod and by ipBlock.
const MAPPED_PEER: &str = "10.244.1.5";
/// Its address spelled as IPv6.
const MAPPED_PEER_V6: &str = "::ffff:10.244.1.5";
/// The endpoint's own IPv4 address spelled as IPv6.
const MAPPED_ME_V6: &str = "::ffff:10.0.0.10";

/// The endpoint at `V4.me` and `V6.me` with `flags`, and the pod at [`MAPPED_PEER`] (identity
/// PEER, with the CIDR identity of an ipBlock 10.244.1.5/32); TCP and UDP on every port admitted
/// in both directions for `identity`: PEER, CIDR_ID or ANY, as the compiler writes a rule
/// admitting that pod, that ipBlock or every peer.
fn mapped_world(tag: &str, flags: u32, identity: u32) -> Result<Fixture> {
    let mut f = Fixture::new(tag)?;
    f.endpoint(TEST_IFINDEX, EP, EP_IDENTITY, flags)?;
    f.ipcache(&host(&V4, V4.me), EP_IDENTITY, identity::ANY)?;
    f.ipcache(&host(&V6, V6.me), EP_IDENTITY, identity::ANY)?;
    f.ipcache(&format!("{MAPPED_PEER}/32"), PEER, CIDR_ID)?;
    for direction in [Direction::Ingress, Direction::Egress] {
        for protocol in [proto::TCP, proto::UDP] {
            f.allow_range(EP, direction, identity, protocol, (1, u16::MAX), 500)?;
        }
    }
    Ok(f)
}

#[test]
fn v4_mapped_ipv6_packets_drop_where_isolated_though_the_ipv4_address_is_admitted() -> Result<()> {
    for (name, admitted) in [("pod", PEER), ("ipBlock", CIDR_ID), ("any", identity::ANY)] {
        let f = mapped_world("v4mapped", BOTH, admitted)?;
        let run = |program, spec: &PacketSpec, reasons: &[Reason]| {
            f.expect(program, spec, 0, reasons)
                .with_context(|| format!("admitted by {name}"))
        };
        // The IPv4 SYN from the admitted pod is allowed, and the flow established.
        let v4 = PacketSpec::tcp(MAPPED_PEER, 40000, V4.me, 8080);
        run(TO_POD, &v4, &[AllowedByPolicy])?;
        run(TO_POD, &v4.clone().flags(TCP_ACK), &[AllowedEstablished])?;
        // The same SYN in IPv6, from the address's IPv4-mapped spelling: not that pod, not in
        // that ipBlock, and no IPv6 rule can name it.
        let v6 = PacketSpec::tcp(MAPPED_PEER_V6, 40001, V6.me, 8080);
        run(TO_POD, &v6, &[DroppedV4Mapped])?;
        // Both ends spelled as IPv4-mapped: exactly the IPv4 flow's conntrack key, which a
        // lookup would find (established one way, a reply the other).
        let both = PacketSpec::tcp(MAPPED_PEER_V6, 40000, MAPPED_ME_V6, 8080);
        run(TO_POD, &both.clone().flags(TCP_ACK), &[DroppedV4Mapped])?;
        run(FROM_POD, &both.reply(), &[DroppedV4Mapped])?;
        // The IPv4 flow itself is untouched by those.
        run(FROM_POD, &v4.reply(), &[AllowedReply])?;
        // Egress to the mapped spelling of the admitted pod.
        let out = PacketSpec::udp(V6.me, 40002, MAPPED_PEER_V6, 53);
        run(FROM_POD, &out, &[DroppedV4Mapped])?;
        run(
            FROM_POD,
            &PacketSpec::udp(V4.me, 40002, MAPPED_PEER, 53),
            &[AllowedByPolicy],
        )?;
        // Whatever comes after the fixed header: ICMPv6, a later fragment, extension headers.
        let icmp6 = PacketSpec::new(proto::ICMPV6, MAPPED_PEER_V6, 0, V6.me, 0);
        run(TO_POD, &icmp6, &[DroppedV4Mapped])?;
        run(
            TO_POD,
            &v6.clone().fragment(8, false, 5),
            &[DroppedV4Mapped],
        )?;
        run(
            TO_POD,
            &v6.clone().ipv6_ext(&[EXT_HOPOPTS]),
            &[DroppedV4Mapped],
        )?;
        // An IPv4-compatible spelling (`::a.b.c.d`) is a plain IPv6 address: looked up as one.
        let compatible = PacketSpec::tcp("::10.244.1.5", 40003, V6.me, 8080);
        let judged = if admitted == identity::ANY {
            AllowedByPolicy
        } else {
            DroppedPolicy
        };
        run(TO_POD, &compatible, &[judged])?;
    }
    Ok(())
}

#[test]
fn v4_mapped_ipv6_packets_pass_unpoliced_and_unrecorded_where_not_isolated() -> Result<()> {
    // Ingress not isolated, egress isolated with no rule: an IPv6 packet from the mapped
    // spelling passes the ingress unpoliced, and records nothing that would let the IPv4
    // flow's reply out.
    let f = mapped_world("v4mapped-open", endpoint_flags::EGRESS_ISOLATED, OTHER)?;
    let both = PacketSpec::tcp(MAPPED_PEER_V6, 40000, MAPPED_ME_V6, 8080);
    f.expect(TO_POD, &both, 0, &[AllowedNotPoliced])?;
    f.expect(
        TO_POD,
        &PacketSpec::tcp(MAPPED_PEER_V6, 40001, V6.me, 8080),
        0,
        &[AllowedNotPoliced],
    )?;
    let v4 = PacketSpec::tcp(MAPPED_PEER, 40000, V4.me, 8080);
    f.expect(FROM_POD, &v4.reply(), 0, &[DroppedPolicy])?;
    f.expect(FROM_POD, &both.reply(), 0, &[DroppedV4Mapped])?;
    // The IPv4 SYN, by contrast, is recorded and its reply passes the isolated egress.
    f.expect(TO_POD, &v4, 0, &[AllowedNotIsolated])?;
    f.expect(FROM_POD, &v4.reply(), 0, &[AllowedReply])?;
    // Not isolated at all: every such packet passes, in both hooks.
    let open = mapped_world("v4mapped-none", 0, OTHER)?;
    open.expect(TO_POD, &both, 0, &[AllowedNotPoliced])?;
    open.expect(FROM_POD, &both.reply(), 0, &[AllowedNotPoliced])?;
    let out = PacketSpec::udp(V6.me, 40002, MAPPED_PEER_V6, 53);
    open.expect(FROM_POD, &out, 0, &[AllowedNotPoliced])?;
    Ok(())
}

#[test]
fn v4_mapped_ipv6_packets_with_a_deferred_egress_decision_drop() -> Result<()> {
    // Only egress-isolated endpoints defer: the decision carried in the mark drops such a
    // packet on the uplink and at a local backend, whatever the backend's own isolation.
    let f = mapped_world("v4mapped-deferred", 0, PEER)?;
    let mark = EP << MARK_SHIFT;
    let out = PacketSpec::tcp(V6.me, 40000, MAPPED_PEER_V6, 80);
    f.expect(TO_NETWORK, &out, mark, &[DroppedV4Mapped])?;
    f.expect(TO_POD, &out, mark, &[DroppedV4Mapped])?;
    // Unmarked on the uplink: not ours to judge, not counted.
    f.expect(TO_NETWORK, &out, 0, &[])?;
    Ok(())
}

#[test]
fn v4_mapped_drops_are_reported_as_ipv6_events() -> Result<()> {
    policy_tests::pin_to_cpu(0)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let _guard = runtime.enter();
    let mut f = mapped_world("v4mapped-events", endpoint_flags::INGRESS_ISOLATED, PEER)?;
    let mut reader = f.dp.events()?;
    let inbound = PacketSpec::tcp(MAPPED_PEER_V6, 40000, V6.me, 8080);
    f.expect(TO_POD, &inbound, 0, &[DroppedV4Mapped])?;
    // Not isolated: passes, and passing unpoliced is no event.
    f.expect(FROM_POD, &inbound.reply(), 0, &[AllowedNotPoliced])?;
    let mut events = Vec::new();
    reader.try_read(&mut events);
    assert_eq!(events.len(), 1, "{events:?}");
    let ev = events[0];
    assert_eq!(ev.reason, DroppedV4Mapped as u32);
    assert_eq!(ev.endpoint, EP);
    assert_eq!(ev.direction, Direction::Ingress as u8);
    // An IPv6 event with both addresses; nothing after the fixed header was parsed.
    let octets = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
    assert_eq!(ev.family, 6);
    assert_eq!((ev.src, ev.dst), (octets(MAPPED_PEER_V6), octets(V6.me)));
    assert_eq!((ev.protocol, ev.sport, ev.dport), (0, 0, 0));
    assert_eq!(ev.peer_identity, 0);
    Ok(())
}

#[test]
fn missing_or_unprogrammed_endpoint_fails_closed() -> Result<()> {
    let mut f = Fixture::new("noendpoint")?;
    let pkt = PacketSpec::tcp(V4.me, 40000, V4.peer, 80);
    f.expect(FROM_POD, &pkt, 0, &[DroppedEndpointNotProgrammed])?;
    f.expect(TO_POD, &pkt.reply(), 0, &[DroppedEndpointNotProgrammed])?;

    // NOT_PROGRAMMED overrides "not isolated" for new flows...
    f.endpoint(TEST_IFINDEX, EP, EP_IDENTITY, 0)?;
    f.expect(FROM_POD, &pkt, 0, &[AllowedNotIsolated])?;
    f.endpoint(
        TEST_IFINDEX,
        EP,
        EP_IDENTITY,
        endpoint_flags::NOT_PROGRAMMED,
    )?;
    let other = PacketSpec::tcp(V4.me, 40001, V4.peer, 80);
    f.expect(FROM_POD, &other, 0, &[DroppedEndpointNotProgrammed])?;
    f.expect(
        TO_POD,
        &other.reply().flags(0x02),
        0,
        &[DroppedEndpointNotProgrammed],
    )?;
    // ...and the established flow is re-checked (the flags changed) and cut.
    f.expect(FROM_POD, &pkt.flags(TCP_ACK), 0, &[DroppedRevoked])?;

    // With mark bits unset in CONFIG, Service traffic of an egress-isolated pod cannot be
    // deferred: it drops instead of passing unjudged.
    f.endpoint(TEST_IFINDEX, EP, EP_IDENTITY, BOTH)?;
    f.service(V4.service)?;
    f.dp.set_config(Config::with_mark_mask(0))?;
    let to_service = PacketSpec::tcp(V4.me, 40002, V4.service, 80);
    f.expect(FROM_POD, &to_service, 0, &[DroppedInternal])?;
    Ok(())
}

#[test]
fn non_isolated_direction_passes_and_records_the_flow() -> Result<()> {
    for a in [V4, V6] {
        let mut f = world("notisolated", &a)?;
        f.endpoint(
            TEST_IFINDEX,
            EP,
            EP_IDENTITY,
            endpoint_flags::INGRESS_ISOLATED,
        )?;
        let out = PacketSpec::udp(a.me, 40000, a.far, 9999);
        f.expect(FROM_POD, &out, 0, &[AllowedNotIsolated])?;
        // Its reply crosses the isolated ingress.
        f.expect(TO_POD, &out.reply(), 0, &[AllowedReply])?;
        f.expect(
            TO_POD,
            &PacketSpec::udp(a.far, 9999, a.me, 40001),
            0,
            &[DroppedPolicy],
        )?;
    }
    Ok(())
}

#[test]
fn node_reaches_its_pods_and_pods_reach_themselves() -> Result<()> {
    for a in [V4, V6] {
        let f = world("hostself", &a)?;
        let probe = PacketSpec::tcp(a.host, 33000, a.me, 8443);
        f.expect(TO_POD, &probe, 0, &[AllowedHost])?;
        f.expect(FROM_POD, &probe.reply(), 0, &[AllowedReply])?;
        f.expect(
            FROM_POD,
            &PacketSpec::tcp(a.me, 40000, a.host, 10250),
            0,
            &[AllowedHost],
        )?;
        let own = PacketSpec::tcp(a.me, 40001, a.me, 9);
        f.expect(FROM_POD, &own, 0, &[AllowedSelf])?;
        f.expect(TO_POD, &own, 0, &[AllowedSelf])?;
    }
    Ok(())
}

#[test]
fn cidr_rules_match_world_and_pod_addresses() -> Result<()> {
    for a in [V4, V6] {
        let mut f = world("cidr", &a)?;
        f.allow(EP, Direction::Egress, CIDR_ID, proto::TCP, 443, 300)?;
        f.expect(
            FROM_POD,
            &PacketSpec::tcp(a.me, 40000, a.world, 443),
            0,
            &[AllowedByPolicy],
        )?;
        f.expect(
            FROM_POD,
            &PacketSpec::tcp(a.me, 40001, a.far, 443),
            0,
            &[DroppedPolicy],
        )?;
        // ipBlock matches pod IPs too: OTHER's /32 carries the CIDR identity...
        f.ipcache(&host(&a, a.other), OTHER, CIDR_ID)?;
        f.expect(
            FROM_POD,
            &PacketSpec::tcp(a.me, 40002, a.other, 443),
            0,
            &[AllowedByPolicy],
        )?;
        // ...unless an `except` carves it out (its /32 then has no CIDR identity).
        f.ipcache(&host(&a, a.other), OTHER, identity::ANY)?;
        f.expect(
            FROM_POD,
            &PacketSpec::tcp(a.me, 40003, a.other, 443),
            0,
            &[DroppedPolicy],
        )?;
    }
    Ok(())
}

#[test]
fn any_peer_and_all_port_rules() -> Result<()> {
    let mut f = world("anyport", &V4)?;
    f.allow(EP, Direction::Ingress, identity::ANY, proto::TCP, 9090, 400)?;
    f.expect(
        TO_POD,
        &PacketSpec::tcp(V4.far, 1234, V4.me, 9090),
        0,
        &[AllowedByPolicy],
    )?;
    f.expect(
        TO_POD,
        &PacketSpec::udp(V4.far, 1234, V4.me, 9090),
        0,
        &[DroppedPolicy],
    )?;
    // Every UDP port for OTHER.
    let all_udp = policy_entry(EP, Direction::Ingress, OTHER, proto::UDP, 0, u16::MAX);
    f.allow_entry(all_udp, 401)?;
    for port in [1, 4242, 65535] {
        let pkt = PacketSpec::udp(V4.other, 1000, V4.me, port);
        f.expect(TO_POD, &pkt, 0, &[AllowedByPolicy])?;
    }
    f.expect(
        TO_POD,
        &PacketSpec::tcp(V4.other, 1000, V4.me, 4242),
        0,
        &[DroppedPolicy],
    )?;
    Ok(())
}

#[test]
fn port_ranges_are_port_prefixes() -> Result<()> {
    let mut f = world("range", &V6)?;
    f.allow_range(EP, Direction::Egress, PEER, proto::SCTP, (8000, 8010), 500)?;
    for (port, allowed) in [
        (7999, false),
        (8000, true),
        (8007, true),
        (8010, true),
        (8011, false),
    ] {
        let pkt = PacketSpec::sctp(V6.me, 40000 + port, V6.peer, port);
        let reason = if allowed {
            AllowedByPolicy
        } else {
            DroppedPolicy
        };
        f.expect(FROM_POD, &pkt, 0, &[reason])?;
    }
    Ok(())
}

#[test]
fn service_traffic_is_deferred_with_the_source_in_the_mark() -> Result<()> {
    for a in [V4, V6] {
        let mut f = world("svcdefer", &a)?;
        f.service(a.service)?;
        let pkt = PacketSpec::tcp(a.me, 40000, a.service, 80);
        // kube-proxy's bits survive; ours carry the endpoint id.
        let run = f.expect(FROM_POD, &pkt, 0x4000, &[DeferredService])?;
        assert_eq!(run.mark, 0x4000 | (EP << MARK_SHIFT));
        let run = f.expect(FROM_POD, &pkt.clone().flags(TCP_ACK), 0, &[DeferredService])?;
        assert_eq!(run.mark, EP << MARK_SHIFT);
        // The un-DNATed reply finds the pre-DNAT entry.
        f.expect(TO_POD, &pkt.reply(), 0, &[AllowedReply])?;
        // Not egress-isolated: no deferral, the flow is recorded all the same.
        f.endpoint(
            TEST_IFINDEX,
            EP,
            EP_IDENTITY,
            endpoint_flags::INGRESS_ISOLATED,
        )?;
        let other = PacketSpec::udp(a.me, 40001, a.service, 53);
        let run = f.expect(FROM_POD, &other, 0, &[AllowedNotIsolated])?;
        assert_eq!(run.mark, 0);
        f.expect(TO_POD, &other.reply(), 0, &[AllowedReply])?;
        // Egress isolation comes back: that flow is now deferred too.
        f.endpoint(TEST_IFINDEX, EP, EP_IDENTITY, BOTH)?;
        let run = f.expect(FROM_POD, &other, 0, &[DeferredService])?;
        assert_eq!(run.mark, EP << MARK_SHIFT);
    }
    Ok(())
}

const SOURCE: u32 = 20;
const SOURCE_IDENTITY: u32 = 3000;
const SOURCE_IFINDEX: u32 = 4242;

/// The backend (the endpoint under test, ingress-isolated) and a Service client SOURCE on
/// another veth, egress-isolated, allowed to the backend's TCP 8080 only.
fn backend_world(tag: &str, a: &Addrs) -> Result<Fixture> {
    let mut f = world(tag, a)?;
    f.endpoint(SOURCE_IFINDEX, SOURCE, SOURCE_IDENTITY, BOTH)?;
    f.ipcache(&host(a, a.peer), SOURCE_IDENTITY, identity::ANY)?;
    f.allow(
        SOURCE,
        Direction::Egress,
        EP_IDENTITY,
        proto::TCP,
        8080,
        600,
    )?;
    f.allow(
        EP,
        Direction::Ingress,
        SOURCE_IDENTITY,
        proto::TCP,
        8080,
        601,
    )?;
    f.allow(
        EP,
        Direction::Ingress,
        SOURCE_IDENTITY,
        proto::TCP,
        8081,
        602,
    )?;
    Ok(f)
}

#[test]
fn deferred_egress_is_decided_at_a_local_backend() -> Result<()> {
    for a in [V4, V6] {
        let f = backend_world("svclocal", &a)?;
        let mark = SOURCE << MARK_SHIFT;
        // After DNAT: source pod → backend (the endpoint under test) on the target port.
        let pkt = PacketSpec::tcp(a.peer, 41000, a.me, 8080);
        let run = f.expect(
            TO_POD,
            &pkt,
            mark | 0x8000,
            &[AllowedByPolicy, AllowedByPolicy],
        )?;
        assert_eq!(
            run.mark, 0x8000,
            "our mark bits are cleared, kube-proxy's kept"
        );
        let next = pkt.clone().flags(TCP_ACK);
        let run = f.expect(
            TO_POD,
            &next,
            mark,
            &[AllowedEstablished, AllowedEstablished],
        )?;
        assert_eq!(run.mark, 0);
        // The backend allows 8081 from the source, but the source's egress does not.
        let run = f.expect(
            TO_POD,
            &PacketSpec::tcp(a.peer, 41001, a.me, 8081),
            mark,
            &[DroppedPolicy],
        )?;
        assert_eq!(run.mark, 0);
        // Without the mark it is plain ingress, which allows it.
        f.expect(
            TO_POD,
            &PacketSpec::tcp(a.peer, 41002, a.me, 8081),
            0,
            &[AllowedByPolicy],
        )?;
        // An unknown source endpoint in the mark fails closed.
        let unknown = PacketSpec::tcp(a.peer, 41003, a.me, 8080);
        f.expect(
            TO_POD,
            &unknown,
            99 << MARK_SHIFT,
            &[DroppedEndpointNotProgrammed],
        )?;
        // Hairpin: the backend reaching itself through its own Service.
        let hairpin = PacketSpec::tcp(a.host, 41004, a.me, 8080);
        f.expect(
            TO_POD,
            &hairpin,
            EP << MARK_SHIFT,
            &[AllowedSelf, AllowedHost],
        )?;
    }
    Ok(())
}

#[test]
fn deferred_egress_is_decided_on_the_uplink() -> Result<()> {
    for a in [V4, V6] {
        let mut f = backend_world("svcremote", &a)?;
        f.ipcache(&host(&a, a.other), OTHER, identity::ANY)?;
        f.allow(SOURCE, Direction::Egress, OTHER, proto::UDP, 5353, 700)?;
        let mark = SOURCE << MARK_SHIFT;
        let allowed = PacketSpec::udp(a.peer, 41000, a.other, 5353);
        let run = f.expect(TO_NETWORK, &allowed, mark, &[AllowedByPolicy])?;
        assert_eq!(run.mark, 0);
        f.expect(TO_NETWORK, &allowed, mark, &[AllowedEstablished])?;
        let denied = PacketSpec::udp(a.peer, 41001, a.other, 5354);
        f.expect(TO_NETWORK, &denied, mark, &[DroppedPolicy])?;
        // Unmarked traffic is not ours to judge: neither parsed nor counted. Neither is traffic
        // that carries only bits outside our mask (kube-proxy's 0x4000 masquerade mark).
        f.expect(TO_NETWORK, &denied, 0, &[])?;
        let garbage = &denied.build()[..denied.l4_offset() + 2];
        f.expect_bytes(TO_NETWORK, garbage, 0, &[])?;
        f.expect_bytes(TO_NETWORK, garbage, 0x4000, &[])?;
        f.expect_bytes(TO_NETWORK, garbage, mark, &[DroppedTruncated])?;
    }
    Ok(())
}

#[test]
fn revoked_rules_cut_established_flows() -> Result<()> {
    let mut f = world("revoke", &V4)?;
    let out = PacketSpec::tcp(V4.me, 40000, V4.peer, 80);
    f.expect(FROM_POD, &out, 0, &[AllowedByPolicy])?;
    let inbound = PacketSpec::udp(V4.peer, 50000, V4.me, 5353);
    f.expect(TO_POD, &inbound, 0, &[AllowedByPolicy])?;

    // An unrelated change re-checks the flows, which stay allowed.
    let unrelated = policy_entry(EP, Direction::Egress, OTHER, proto::TCP, 1, 1);
    f.allow_entry(unrelated, 900)?;
    f.revoke(unrelated)?;
    f.expect(
        FROM_POD,
        &out.clone().flags(TCP_ACK),
        0,
        &[AllowedEstablished],
    )?;
    f.expect(FROM_POD, &inbound.reply(), 0, &[AllowedReply])?;

    // Revoking the egress rule cuts the flow on its next packet and forgets it.
    f.revoke(policy_entry(
        EP,
        Direction::Egress,
        PEER,
        proto::TCP,
        80,
        80,
    ))?;
    f.expect(FROM_POD, &out.clone().flags(TCP_ACK), 0, &[DroppedRevoked])?;
    f.expect(TO_POD, &out.reply(), 0, &[DroppedPolicy])?;
    let ct = f.dp.conntrack_entries()?;
    assert!(
        !ct.iter()
            .any(|(k, _)| k.a_port == 40000 || k.b_port == 40000),
        "revoked entry still in conntrack"
    );
    // Revoking the ingress rule cuts the reply direction of that flow as well.
    f.revoke(policy_entry(
        EP,
        Direction::Ingress,
        PEER,
        proto::UDP,
        5353,
        5353,
    ))?;
    f.expect(FROM_POD, &inbound.reply(), 0, &[DroppedRevoked])?;
    // A changed peer identity also counts: re-allow, then move PEER's address to OTHER.
    f.allow(EP, Direction::Egress, PEER, proto::TCP, 80, 101)?;
    f.expect(FROM_POD, &out, 0, &[AllowedByPolicy])?;
    f.ipcache(&host(&V4, V4.peer), OTHER, identity::ANY)?;
    f.expect(FROM_POD, &out.flags(TCP_ACK), 0, &[DroppedRevoked])?;
    Ok(())
}

#[test]
fn conntrack_timeouts_and_tcp_closing() -> Result<()> {
    let mut f = world("timeouts", &V4)?;
    let tcp = PacketSpec::tcp(V4.me, 40000, V4.peer, 80);
    f.expect(FROM_POD, &tcp, 0, &[AllowedByPolicy])?;
    f.expect(
        FROM_POD,
        &tcp.clone().flags(TCP_FIN | TCP_ACK),
        0,
        &[AllowedEstablished],
    )?;
    let entry =
        f.dp.conntrack_entries()?
            .into_iter()
            .find(|(k, _)| k.a_port == 40000 || k.b_port == 40000)
            .expect("conntrack entry");
    assert_ne!(
        entry.1.flags & ct_flags::CLOSING,
        0,
        "FIN marks the entry closing"
    );
    assert_eq!(entry.1.rule, 100 + proto::TCP as u32);

    // With a UDP timeout of 0 every packet is new: the reply finds nothing.
    let mut config = Config::DEFAULT;
    config.ct_udp_timeout_s = 0;
    f.dp.set_config(config)?;
    let udp = PacketSpec::udp(V4.me, 40001, V4.peer, 53);
    f.expect(FROM_POD, &udp, 0, &[AllowedByPolicy])?;
    f.expect(TO_POD, &udp.reply(), 0, &[DroppedPolicy])?;
    // Back to 60 s: the entry (stamped a moment ago) is live again.
    f.dp.set_config(Config::DEFAULT)?;
    f.expect(FROM_POD, &udp, 0, &[AllowedEstablished])?;
    f.expect(TO_POD, &udp.reply(), 0, &[AllowedReply])?;
    Ok(())
}

/// ENDPOINT_SLOTS, the veth hooks' endpoint lookup, read through its pin with plain `bpf(2)`
/// calls.
fn slot(f: &Fixture, ifindex: u32) -> Result<EndpointSlot> {
    let map = PinnedMap::open(&f.dp.pin_dir().join("maps").join(map_names::ENDPOINT_SLOTS))?;
    let value = map
        .lookup(&ifindex.to_ne_bytes())?
        .context("every slot exists")?;
    read_pod(&value)
}

fn set_slot(f: &Fixture, ifindex: u32, value: EndpointSlot) -> Result<()> {
    let map = PinnedMap::open(&f.dp.pin_dir().join("maps").join(map_names::ENDPOINT_SLOTS))?;
    map.update(&ifindex.to_ne_bytes(), &value.0.to_ne_bytes())
}

/// The agent keeps each host veth's slot equal to its ENDPOINTS entry (written after it,
/// emptied before its removal, rewritten on restart), and the programs act on the slot: a
/// slot saying NOT_PROGRAMMED drops what ENDPOINTS would allow, and an empty slot sends them
/// to ENDPOINTS.
#[test]
fn the_hooks_read_the_endpoint_slot_which_mirrors_endpoints() -> Result<()> {
    let mut f = world("slots", &V4)?;
    let info =
        f.dp.endpoints()
            .into_iter()
            .find(|(ifindex, _)| *ifindex == TEST_IFINDEX)
            .map(|(_, info)| info)
            .context("the endpoint")?;
    let written = slot(&f, TEST_IFINDEX)?;
    assert_eq!(written, EndpointSlot::pack(&info).unwrap());
    assert_eq!(
        written.unpack().map(|e| (e.id, e.flags, e.generation)),
        Some((EP, BOTH, info.generation))
    );
    assert_eq!(slot(&f, TEST_IFINDEX + 1)?, EndpointSlot::EMPTY);

    let new_flow = PacketSpec::udp(V4.me, 41000, V4.peer, 53);
    let not_programmed = EndpointInfo {
        flags: info.flags | endpoint_flags::NOT_PROGRAMMED,
        ..info
    };
    set_slot(
        &f,
        TEST_IFINDEX,
        EndpointSlot::pack(&not_programmed).unwrap(),
    )?;
    f.expect(FROM_POD, &new_flow, 0, &[DroppedEndpointNotProgrammed])?;
    // Empty: ENDPOINTS' entry decides.
    set_slot(&f, TEST_IFINDEX, EndpointSlot::EMPTY)?;
    f.expect(FROM_POD, &new_flow, 0, &[AllowedByPolicy])?;

    // A restart rewrites a slot left behind by an agent stopped between its two writes.
    set_slot(
        &f,
        TEST_IFINDEX,
        EndpointSlot::pack(&not_programmed).unwrap(),
    )?;
    f.reopen()?;
    assert_eq!(slot(&f, TEST_IFINDEX)?, written);
    f.expect(FROM_POD, &new_flow, 0, &[AllowedEstablished])?;

    // A changed endpoint's slot changes with it, generation included.
    f.endpoint(
        TEST_IFINDEX,
        EP,
        EP_IDENTITY,
        endpoint_flags::EGRESS_ISOLATED,
    )?;
    let changed = slot(&f, TEST_IFINDEX)?.unpack().context("written")?;
    assert_eq!(changed.flags, endpoint_flags::EGRESS_ISOLATED);
    assert_ne!(changed.generation, info.generation);
    // Removed: the slot is empty and the hooks find no endpoint (fail closed).
    f.dp.remove_endpoint(TEST_IFINDEX)?;
    assert_eq!(slot(&f, TEST_IFINDEX)?, EndpointSlot::EMPTY);
    f.expect(FROM_POD, &new_flow, 0, &[DroppedEndpointNotProgrammed])?;
    Ok(())
}

/// Conntrack's clock is kernel ticks (jiffies) at the rate the loader found: an idle flow is
/// live for its timeout and expires after it. A wrong tick rate would stretch or shrink the
/// timeout (a rate of 0 expires every entry at once).
#[test]
fn an_idle_flow_lives_for_its_timeout_in_seconds_and_no_longer() -> Result<()> {
    let mut f = world("idle", &V4)?;
    let mut config = Config::DEFAULT;
    config.ct_udp_timeout_s = 3;
    f.dp.set_config(config)?;
    let udp = PacketSpec::udp(V4.me, 40002, V4.peer, 53);
    f.expect(FROM_POD, &udp, 0, &[AllowedByPolicy])?;
    // Each hit refreshes the entry: replies keep passing while the flow is active, for longer
    // than the timeout.
    for _ in 0..5 {
        std::thread::sleep(std::time::Duration::from_millis(500));
        f.expect(TO_POD, &udp.reply(), 0, &[AllowedReply])?;
    }
    // Idle for 1.5 s of a 3 s timeout: still live.
    std::thread::sleep(std::time::Duration::from_millis(1_500));
    f.expect(TO_POD, &udp.reply(), 0, &[AllowedReply])?;
    // Idle for 3.5 s: expired, the reply is a new flow the ingress policy does not allow.
    std::thread::sleep(std::time::Duration::from_millis(3_500));
    f.expect(TO_POD, &udp.reply(), 0, &[DroppedPolicy])?;
    Ok(())
}

#[test]
fn verdict_events_name_the_rule_and_are_rate_limited() -> Result<()> {
    // The rate limit is per CPU: keep every run on one.
    policy_tests::pin_to_cpu(0)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let _guard = runtime.enter();
    let mut config = Config::DEFAULT;
    config.events_allowed = 1;
    config.events_per_sec = 3;
    let mut f = world("events", &V4)?;
    f.dp.set_config(config)?;
    let mut reader = f.dp.events()?;

    f.expect(
        FROM_POD,
        &PacketSpec::udp(V4.me, 40000, V4.peer, 53),
        0,
        &[AllowedByPolicy],
    )?;
    f.expect(
        FROM_POD,
        &PacketSpec::udp(V4.me, 40000, V4.peer, 54),
        0,
        &[DroppedPolicy],
    )?;
    let mut events = Vec::new();
    reader.try_read(&mut events);
    assert_eq!(events.len(), 2, "{events:?}");
    let allowed = events[0];
    assert_eq!(allowed.reason, AllowedByPolicy as u32);
    assert_eq!(allowed.rule, 100 + proto::UDP as u32);
    assert_eq!(allowed.endpoint, EP);
    assert_eq!(allowed.peer_identity, PEER);
    assert_eq!((allowed.sport, allowed.dport), (40000, 53));
    assert_eq!(allowed.direction, Direction::Egress as u8);
    assert_eq!(allowed.family, 4);
    assert_eq!(allowed.ifindex, TEST_IFINDEX);
    let dropped = events[1];
    assert_eq!(dropped.reason, DroppedPolicy as u32);
    assert_eq!(dropped.rule, 0);

    // Budget of 3 per second: one left in this window.
    for port in 1..=5 {
        let pkt = PacketSpec::udp(V4.me, 40001, V4.peer, 60 + port);
        f.expect(FROM_POD, &pkt, 0, &[DroppedPolicy])?;
    }
    events.clear();
    reader.try_read(&mut events);
    assert_eq!(events.len(), 1, "rate limit: {events:?}");

    // Established packets are not events.
    assert_eq!(
        f.run(FROM_POD, &PacketSpec::udp(V4.me, 40000, V4.peer, 53), 0)?
            .action,
        TC_ACT_UNSPEC
    );
    events.clear();
    reader.try_read(&mut events);
    assert!(events.is_empty());
    Ok(())
}

#[test]
fn full_maps_are_reported_as_such() -> Result<()> {
    let mut f = Fixture::new("mapfull")?;
    let capacity = policy_common::capacity::ENDPOINTS;
    for ifindex in 0..capacity {
        f.endpoint(100 + ifindex, 1 + ifindex % (capacity - 1), 256, 0)?;
    }
    let err =
        f.dp.upsert_endpoint(
            100 + capacity,
            policy_common::EndpointInfo {
                id: 1,
                flags: 0,
                generation: 0,
                identity: 256,
            },
        )
        .expect_err("ENDPOINTS is full");
    assert!(err.is_map_full(), "{err}");
    assert!(err.to_string().contains("ENDPOINTS"), "{err}");
    let usage = f.dp.map_usage()?;
    let endpoints = usage.iter().find(|u| u.map == "ENDPOINTS").unwrap();
    assert_eq!(endpoints.entries, u64::from(capacity));
    Ok(())
}

/// `map_usage` counts in batches of a few thousand entries (hash maps, and the LPM tries where the
/// kernel's generic batch walk covers them; a key walk otherwise): the counts agree with a
/// `BPF_MAP_GET_NEXT_KEY` walk of the pinned map, for a CONNTRACK holding several batches (and a
/// partial last one) and for an IPCACHE_V4 of more than one batch of prefixes.
#[test]
fn map_usage_counts_many_entries_exactly() -> Result<()> {
    let f = Fixture::new("mapcount")?;
    let maps = f.dp.pin_dir().join("maps");
    let conntrack = PinnedMap::open(&maps.join(map_names::CONNTRACK))?;
    let ipcache = PinnedMap::open(&maps.join(map_names::IPCACHE_V4))?;
    let counted = |f: &Fixture, name: &str| -> Result<u64> {
        Ok(f.dp
            .map_usage()?
            .iter()
            .find(|u| u.map == name)
            .with_context(|| format!("{name} in map_usage"))?
            .entries)
    };
    assert_eq!(counted(&f, map_names::CONNTRACK)?, 0);
    let value = vec![0u8; conntrack.value_size as usize];
    for (written, total) in [(1u32, 1u64), (9_999, 10_000), (3_000, 13_000)] {
        let before = total - u64::from(written);
        for i in before..total {
            let mut key = vec![0u8; conntrack.key_size as usize];
            key[..8].copy_from_slice(&i.to_le_bytes());
            conntrack.update(&key, &value)?;
        }
        assert_eq!(conntrack.keys()?.len() as u64, total);
        assert_eq!(counted(&f, map_names::CONNTRACK)?, total);
    }
    // LPM trie keys: a 32-bit prefix length, then the address.
    let value = vec![0u8; ipcache.value_size as usize];
    for i in 0..5_000u32 {
        let mut key = 24u32.to_ne_bytes().to_vec();
        key.extend_from_slice(&(0x0a00_0000 | (i << 8)).to_be_bytes());
        ipcache.update(&key, &value)?;
    }
    assert_eq!(ipcache.keys()?.len(), 5_000);
    assert_eq!(counted(&f, map_names::IPCACHE_V4)?, 5_000);
    Ok(())
}

#[test]
fn policy_groups_span_chunks_and_survive_a_restart() -> Result<()> {
    let mut f = world("chunks", &V4)?;
    // 40 single ports for one peer: three chunks of the (EP, PEER, egress, TCP) group.
    let ports: Vec<u16> = (0..40).map(|i| 1000 + 2 * i).collect();
    let mut diff = policy_agent::compiler::output::MapDiff::default();
    for (i, &port) in ports.iter().enumerate() {
        diff.policy_upsert.insert(
            policy_entry(EP, Direction::Egress, PEER, proto::TCP, port, port),
            policy_common::PolicyValue {
                rule: 1000 + i as u32,
                flags: 0,
            },
        );
    }
    f.dp.apply(&diff)?;
    let probe = |f: &Fixture, sport: u16, port: u16, reason: Reason| {
        f.expect(
            FROM_POD,
            &PacketSpec::tcp(V4.me, sport, V4.peer, port),
            0,
            &[reason],
        )
    };
    probe(&f, 30000, 1000, AllowedByPolicy)?;
    probe(&f, 30000, 1078, AllowedByPolicy)?;
    probe(&f, 30000, 1079, DroppedPolicy)?;
    let usage = f.dp.map_usage()?;
    let policy = usage.iter().find(|u| u.map == "POLICY").unwrap();
    // This group (port 80 from `world` and the 40 ports) fills 3 chunks; `world` wrote one
    // chunk for each of its 5 other groups.
    assert_eq!(policy.entries, 3 + 5);

    // A restarted writer reads the groups back as the same entries: nothing to rewrite.
    let before = f.dp.current();
    f.reopen()?;
    assert_eq!(f.dp.current(), before);
    let report = f.dp.sync(&before)?;
    assert_eq!((report.upserted, report.removed), (0, 0), "{report:?}");

    // Shrinking to 16 entries (two chunks) removes the third; the last ports are no longer
    // allowed, established flows to them are cut.
    let mut shrink = policy_agent::compiler::output::MapDiff::default();
    for &port in &ports[15..] {
        shrink.policy_remove.insert(policy_entry(
            EP,
            Direction::Egress,
            PEER,
            proto::TCP,
            port,
            port,
        ));
    }
    f.dp.apply(&shrink)?;
    f.expect(
        FROM_POD,
        &PacketSpec::tcp(V4.me, 30000, V4.peer, 1078).flags(TCP_ACK),
        0,
        &[DroppedRevoked],
    )?;
    probe(&f, 30001, 1078, DroppedPolicy)?;
    probe(&f, 30001, 1028, AllowedByPolicy)?;
    let usage = f.dp.map_usage()?;
    assert_eq!(
        usage.iter().find(|u| u.map == "POLICY").unwrap().entries,
        2 + 5
    );

    // More than 120 port ranges for one group is a full map, named as such.
    let mut too_many = policy_agent::compiler::output::MapDiff::default();
    for port in 0..121u16 {
        too_many.policy_upsert.insert(
            policy_entry(
                EP,
                Direction::Ingress,
                OTHER,
                proto::UDP,
                2000 + 2 * port,
                2000 + 2 * port,
            ),
            policy_common::PolicyValue { rule: 7, flags: 0 },
        );
    }
    let err = f.dp.apply(&too_many).expect_err("group over capacity");
    assert!(err.is_map_full(), "{err}");
    Ok(())
}
