//! The loader: pins survive the agent, a new agent adopts them (swapping programs atomically,
//! keeping maps and established connections), stale pins are cleaned, the clsact fallback
//! replaces its own filters, and uninstalling removes everything.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Result;
use aya::programs::{SchedClassifier, TcAttachType};
use policy_agent::compiler::output::NodeMaps;
use policy_agent::dataplane::{AttachMode, Dataplane, Role};
use policy_common::{
    Config, Direction, EndpointInfo, IdentityPair, PolicyValue, Reason, endpoint_flags, identity,
    program_names::{FROM_POD, TO_POD},
    proto,
};
use policy_tests::{
    bpffs::PinDir,
    fixture::policy_entry,
    sockets::{Connection, tcp_connects, tcp_echo_server, tcp_server},
    topology::{Node, Pod},
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const CLIENT: (u32, u32) = (1, 1001);
const SERVER: (u32, u32) = (2, 1002);

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// The desired maps: the server admits the client on TCP 8080 only.
fn desired(client: &Pod, server: &Pod, allow_8080: bool) -> Result<NodeMaps> {
    let mut maps = NodeMaps::default();
    let pair = |identity| IdentityPair {
        identity,
        cidr_identity: identity::ANY,
    };
    maps.ipcache_v4
        .insert(format!("{NODE_IP}/32").parse()?, pair(identity::HOST));
    maps.ipcache_v4
        .insert(format!("{}/32", client.ip).parse()?, pair(CLIENT.1));
    maps.ipcache_v4
        .insert(format!("{}/32", server.ip).parse()?, pair(SERVER.1));
    if allow_8080 {
        maps.policy.insert(
            policy_entry(
                SERVER.0,
                Direction::Ingress,
                CLIENT.1,
                proto::TCP,
                8080,
                8080,
            ),
            PolicyValue { rule: 7, flags: 0 },
        );
    }
    Ok(maps)
}

fn endpoint((id, identity): (u32, u32), flags: u32) -> EndpointInfo {
    EndpointInfo {
        id,
        flags,
        generation: 0,
        identity,
    }
}

/// Writes the endpoints and the maps, then attaches both pods.
fn program_node(dp: &mut Dataplane, node: &Node, client: &Pod, server: &Pod) -> Result<()> {
    dp.sync(&desired(client, server, true)?)?;
    dp.upsert_endpoint(client.ifindex, endpoint(CLIENT, 0))?;
    dp.upsert_endpoint(
        server.ifindex,
        endpoint(SERVER, endpoint_flags::INGRESS_ISOLATED),
    )?;
    node.ns.run(|| -> Result<()> {
        dp.attach_endpoint(&client.host_if)?;
        dp.attach_endpoint(&server.host_if)?;
        Ok(())
    })
}

/// Program ids attached (TCX) to `ifname` in `node`.
fn tcx_programs(node: &Node, ifname: &str, attach_type: TcAttachType) -> Result<Vec<u32>> {
    let (_, programs) = node
        .ns
        .run(|| SchedClassifier::query_tcx(ifname, attach_type))?;
    Ok(programs.iter().map(|p| p.id()).collect())
}

/// Opens the dataplane the way the agent does: from inside the node namespace (adoption checks
/// each pinned link's interface there).
fn open(node: &Node, dir: &PinDir, mode: AttachMode) -> Result<Dataplane> {
    Ok(node
        .ns
        .run(|| Dataplane::open_with_mode(dir.path(), Config::DEFAULT, mode))?)
}

fn program_id(dp: &Dataplane, name: &'static str) -> Result<u32> {
    Ok(dp.program(name)?.info()?.id())
}

#[test]
fn a_restarted_agent_adopts_pins_without_a_gap() -> Result<()> {
    let dir = PinDir::new("restart")?;
    let mut node = Node::new("restart-node", NODE_IP)?;
    let client = node.add_pod("restart-c", Ipv4Addr::new(10, 244, 1, 10))?;
    let server = node.add_pod("restart-s", Ipv4Addr::new(10, 244, 1, 11))?;
    let _echo = tcp_echo_server(&server.ns, at(server.ip, 8080))?;
    let _other = tcp_server(&server.ns, at(server.ip, 9090))?;

    let mut dp = open(&node, &dir, AttachMode::Tcx)?;
    assert_eq!(dp.attach_mode(), AttachMode::Tcx);
    // Only the enforcement programs are pinned; the benchmark's `noop` is not loaded.
    let mut pinned: Vec<String> = std::fs::read_dir(dir.path().join("programs"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    pinned.sort();
    assert_eq!(pinned, ["from_pod", "to_network", "to_pod"]);
    assert!(
        dp.program(policy_common::program_names::NOOP)?
            .fd()
            .is_err(),
        "noop not loaded"
    );
    program_node(&mut dp, &node, &client, &server)?;
    assert!(!tcp_connects(&client.ns, at(server.ip, 9090)));
    let mut conn = Connection::open(&client.ns, at(server.ip, 8080))?;
    assert!(conn.round_trip(b"before"));
    let dropped_before = dp.counter(Reason::DroppedPolicy)?;
    assert!(dropped_before > 0);
    let old_program = program_id(&dp, FROM_POD)?;

    // The agent goes away: enforcement stays, the connection keeps working.
    drop(dp);
    assert!(!tcp_connects(&client.ns, at(server.ip, 9090)), "no agent");
    assert!(conn.round_trip(b"no agent"));

    // A new agent adopts everything.
    let mut dp = open(&node, &dir, AttachMode::Tcx)?;
    let mut attached = dp.attached();
    attached.sort();
    assert_eq!(
        attached,
        vec![
            (client.host_if.clone(), Role::Endpoint),
            (server.host_if.clone(), Role::Endpoint)
        ]
    );
    let new_from_pod = program_id(&dp, FROM_POD)?;
    assert_ne!(new_from_pod, old_program, "a fresh program was loaded");
    assert_eq!(
        tcx_programs(&node, &server.host_if, TcAttachType::Ingress)?,
        vec![new_from_pod],
        "the link now runs the new program, and only it"
    );
    assert_eq!(
        tcx_programs(&node, &server.host_if, TcAttachType::Egress)?,
        vec![program_id(&dp, TO_POD)?]
    );
    // Maps were reopened, not recreated: counters, endpoints and conntrack survived.
    assert!(dp.counter(Reason::DroppedPolicy)? > dropped_before);
    assert_eq!(dp.endpoints().len(), 2);
    assert!(conn.round_trip(b"adopted"));
    assert!(!tcp_connects(&client.ns, at(server.ip, 9090)), "adopted");

    // Re-syncing the same desired state writes nothing; attaching again is a no-op.
    let report = dp.sync(&desired(&client, &server, true)?)?;
    assert_eq!((report.upserted, report.removed), (0, 0), "{report:?}");
    node.ns.run(|| dp.attach_endpoint(&server.host_if))?;
    assert_eq!(
        tcx_programs(&node, &server.host_if, TcAttachType::Ingress)?.len(),
        1
    );

    // Revoking the rule cuts the established connection on its next packet.
    let report = dp.sync(&desired(&client, &server, false)?)?;
    assert_eq!(report.removed, 1);
    assert!(report.endpoints_bumped >= 1);
    assert!(!conn.round_trip(b"revoked"));
    assert!(dp.counter(Reason::DroppedRevoked)? > 0);

    // Uninstall: programs detached, pins gone, traffic unpoliced.
    dp.remove_pins()?;
    assert!(!dir.path().exists());
    assert!(tcx_programs(&node, &server.host_if, TcAttachType::Ingress)?.is_empty());
    assert!(tcp_connects(&client.ns, at(server.ip, 9090)), "uninstalled");
    Ok(())
}

#[test]
fn stale_link_pins_are_removed_and_detach_cleans_up() -> Result<()> {
    let dir = PinDir::new("stale")?;
    let mut node = Node::new("stale-node", NODE_IP)?;
    let client = node.add_pod("stale-c", Ipv4Addr::new(10, 244, 1, 10))?;
    let server = node.add_pod("stale-s", Ipv4Addr::new(10, 244, 1, 11))?;
    let mut dp = open(&node, &dir, AttachMode::Tcx)?;
    program_node(&mut dp, &node, &client, &server)?;
    let links = dir.path().join("links");
    assert_eq!(std::fs::read_dir(&links)?.count(), 4);

    // The client pod goes away while no agent runs.
    drop(dp);
    let client_if = client.host_if.clone();
    drop(client);
    let dp = open(&node, &dir, AttachMode::Tcx)?;
    assert_eq!(
        dp.attached(),
        vec![(server.host_if.clone(), Role::Endpoint)]
    );
    let remaining: Vec<String> = std::fs::read_dir(&links)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    assert!(
        remaining
            .iter()
            .all(|name| !name.ends_with(&format!(":{client_if}"))),
        "{remaining:?}"
    );
    assert_eq!(remaining.len(), 2);

    // Detaching removes the links and their pins.
    let mut dp = dp;
    dp.detach(&server.host_if)?;
    assert!(dp.attached().is_empty());
    assert_eq!(std::fs::read_dir(&links)?.count(), 0);
    assert!(tcx_programs(&node, &server.host_if, TcAttachType::Egress)?.is_empty());
    Ok(())
}

#[test]
fn clsact_fallback_attaches_and_replaces_its_own_filters() -> Result<()> {
    let dir = PinDir::new("clsact")?;
    let mut node = Node::new("clsact-node", NODE_IP)?;
    let client = node.add_pod("clsact-c", Ipv4Addr::new(10, 244, 1, 10))?;
    let server = node.add_pod("clsact-s", Ipv4Addr::new(10, 244, 1, 11))?;
    let _servers = [
        tcp_server(&server.ns, at(server.ip, 8080))?,
        tcp_server(&server.ns, at(server.ip, 9090))?,
    ];
    let filters = |direction: &str| -> Result<usize> {
        let out = node
            .ns
            .exec("tc", &["filter", "show", "dev", &server.host_if, direction])?;
        Ok(out
            .lines()
            .filter(|l| l.contains("bpf") && l.contains("handle"))
            .count())
    };

    let mut dp = open(&node, &dir, AttachMode::Clsact)?;
    program_node(&mut dp, &node, &client, &server)?;
    assert!(tcp_connects(&client.ns, at(server.ip, 8080)));
    assert!(!tcp_connects(&client.ns, at(server.ip, 9090)));
    assert_eq!((filters("ingress")?, filters("egress")?), (1, 1));

    // The filters outlive the agent; a new one replaces them in place.
    drop(dp);
    assert!(!tcp_connects(&client.ns, at(server.ip, 9090)), "no agent");
    let mut dp = open(&node, &dir, AttachMode::Clsact)?;
    program_node(&mut dp, &node, &client, &server)?;
    assert_eq!((filters("ingress")?, filters("egress")?), (1, 1));
    assert!(tcp_connects(&client.ns, at(server.ip, 8080)));
    assert!(!tcp_connects(&client.ns, at(server.ip, 9090)));

    node.ns.run(|| dp.detach(&server.host_if))?;
    assert_eq!((filters("ingress")?, filters("egress")?), (0, 0));
    assert!(tcp_connects(&client.ns, at(server.ip, 9090)), "detached");
    Ok(())
}
