//! Chaining: a packet our programs allow goes on to the program after them on the same hook (a
//! CNI's own tc program), a packet they drop does not, in both attach modes.
//!
//! A node with a client and a server pod (real veths, real UDP datagrams), the programs attached
//! the way the agent does it, and after each of them a counting classifier (`tc_counter`): after
//! `from_pod` on the client's host veth (tc ingress) and after `to_pod` on the server's (tc
//! egress). The client's egress allows the server on two ports, the server's ingress allows the
//! client on one of them, so one port passes both hooks, one is dropped by `from_pod` and one by
//! `to_pod`; each counter must see exactly the datagrams its hook allowed.
//!
//! The control: a stand-in program returning `TC_ACT_OK`, which is what our programs returned
//! before, is put between ours and the counter. Every allowed datagram still reaches it (ours go
//! on) and none reaches the counter (an "ok" ends the chain), which is what the counter would
//! have seen with our programs returning `TC_ACT_OK`.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};
use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    tc::{self, NlOptions, TcAttachOptions, TcError, TcHandle},
};
use policy_agent::dataplane::AttachMode;
use policy_common::{
    Config, Direction, Reason, endpoint_flags, identity,
    program_names::{FROM_POD, TO_POD},
    proto,
};
use policy_tests::{
    bpffs::PinDir,
    fixture::Fixture,
    tc_counter::TcCounter,
    testrun::{TC_ACT_OK, TC_ACT_UNSPEC},
    topology::{Node, Pod},
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
/// (endpoint id, identity).
const CLIENT: (u32, u32) = (1, 1001);
const SERVER: (u32, u32) = (2, 1002);
/// Allowed out of the client and into the server.
const ALLOWED: u16 = 7001;
/// Not allowed out of the client: dropped by `from_pod`.
const EGRESS_DENIED: u16 = 7002;
/// Allowed out of the client, not into the server: dropped by `to_pod`.
const INGRESS_DENIED: u16 = 7003;
const PORTS: [u16; 3] = [ALLOWED, EGRESS_DENIED, INGRESS_DENIED];
/// Datagrams sent to each port in a round.
const SENT: u64 = 5;

/// cls_bpf priorities after ours (1): the stand-in runs before the counter.
const STAND_IN_PRIORITY: u16 = 2;
const COUNTER_PRIORITY: u16 = 3;

/// How the programs after ours are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// TCX links placed right after our program.
    TcxLink,
    /// cls_bpf filters on the clsact qdisc at later priorities than ours (behind the whole TCX
    /// chain when ours is a TCX link).
    ClsactFilter,
}

/// One hook: our program on (`ifname`, `attach_type`) of the node.
struct Hook<'a> {
    ours: &'static str,
    pod: &'a Pod,
    attach_type: TcAttachType,
}

impl Hook<'_> {
    fn ifname(&self) -> &str {
        &self.pod.host_if
    }
}

/// Attaches `program` on `hook` after our program: as a TCX link right after it, or as a
/// cls_bpf filter at `priority`.
fn attach_after(
    node: &Node,
    f: &Fixture,
    hook: &Hook<'_>,
    program: &mut SchedClassifier,
    next: Next,
    priority: u16,
) -> Result<()> {
    // A descriptor of our program, taken here: the order is made outside the namespace.
    let order = match next {
        Next::TcxLink => Some(LinkOrder::after_program(f.dp.program(hook.ours)?)?),
        Next::ClsactFilter => None,
    };
    let ifname = hook.ifname();
    let attach_type = hook.attach_type;
    node.ns.run(|| -> Result<()> {
        match order {
            Some(order) => {
                // The link is closed (detached) with the program, from whatever thread.
                program.attach_with_options(
                    ifname,
                    attach_type,
                    TcAttachOptions::TcxOrder(order),
                )?;
            }
            None => {
                match tc::qdisc_add_clsact(ifname) {
                    Ok(()) => {}
                    Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                let id = program.attach_with_options(
                    ifname,
                    attach_type,
                    TcAttachOptions::Netlink(NlOptions {
                        priority,
                        handle: TcHandle::new(0, priority),
                        classid: None,
                    }),
                )?;
                // The filter goes with the interface when the namespace is deleted. aya would
                // remove it on drop through netlink in the dropping thread's namespace, which
                // is not the node's.
                std::mem::forget(program.take_link(id)?);
            }
        }
        Ok(())
    })
}

/// Program ids on the TCX chain of `hook`, in run order.
fn tcx_chain(node: &Node, hook: &Hook<'_>) -> Result<Vec<u32>> {
    let (_, programs) = node
        .ns
        .run(|| SchedClassifier::query_tcx(hook.ifname(), hook.attach_type))?;
    Ok(programs.iter().map(|p| p.id()).collect())
}

/// Names of the cls_bpf filters of `hook`, in priority (run) order.
fn clsact_chain(node: &Node, hook: &Hook<'_>) -> Result<Vec<String>> {
    let direction = match hook.attach_type {
        TcAttachType::Ingress => "ingress",
        _ => "egress",
    };
    let out = node
        .ns
        .exec("tc", &["filter", "show", "dev", hook.ifname(), direction])?;
    // "filter protocol all pref 1 bpf chain 0 handle 0x5eb from_pod direct-action ..."
    Ok(out
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace().skip_while(|w| *w != "handle");
            words.nth(2).map(str::to_owned)
        })
        .collect())
}

/// The chain of `hook` as program names: the TCX links first (they run first), then the
/// clsact qdisc's cls_bpf filters when there is one (`next` decides whether the test made it).
fn chain_of(
    node: &Node,
    f: &Fixture,
    hook: &Hook<'_>,
    next: Next,
    counters: &[(&str, &TcCounter)],
) -> Result<Vec<String>> {
    let ours = f.dp.program(hook.ours)?.info()?.id();
    let mut names = Vec::new();
    for id in tcx_chain(node, hook)? {
        let name = if id == ours {
            Some(hook.ours)
        } else {
            counters
                .iter()
                .find(|(_, c)| c.id().is_ok_and(|cid| cid == id))
                .map(|(name, _)| *name)
        };
        names.push(name.map_or_else(|| format!("program {id}"), str::to_owned));
    }
    if f.dp.attach_mode() == AttachMode::Clsact || next == Next::ClsactFilter {
        names.extend(clsact_chain(node, hook)?);
    }
    Ok(names)
}

/// Server sockets on every port, non-blocking.
fn receivers(server: &Pod) -> Result<Vec<(u16, UdpSocket)>> {
    PORTS
        .iter()
        .map(|&port| {
            let socket = server.ns.run(|| UdpSocket::bind((server.ip, port)))?;
            socket.set_nonblocking(true)?;
            Ok((port, socket))
        })
        .collect()
}

/// Datagrams waiting on `socket`.
fn drain(socket: &UdpSocket) -> Result<u64> {
    let mut buf = [0u8; 64];
    let mut n = 0;
    loop {
        match socket.recv_from(&mut buf) {
            Ok(_) => n += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(n),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends [`SENT`] datagrams from the client to each of `ports` (in that order) and returns what
/// the server received per port, once `expected` datagrams arrived on [`ALLOWED`] (and a moment
/// more, for anything that should not arrive).
fn round(
    client: &Pod,
    server: &Pod,
    receivers: &[(u16, UdpSocket)],
    ports: &[u16],
) -> Result<BTreeMap<u16, u64>> {
    client.ns.run(|| -> Result<()> {
        let socket = UdpSocket::bind((client.ip, 0))?;
        for &port in ports {
            for _ in 0..SENT {
                socket.send_to(b"chained", (server.ip, port))?;
            }
        }
        Ok(())
    })?;
    let mut received: BTreeMap<u16, u64> = PORTS.iter().map(|&p| (p, 0)).collect();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        for (port, socket) in receivers {
            *received.entry(*port).or_default() += drain(socket)?;
        }
        if received[&ALLOWED] >= SENT || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    for (port, socket) in receivers {
        *received.entry(*port).or_default() += drain(socket)?;
    }
    Ok(received)
}

/// Counts of `counter` on every port.
fn counts(counter: &TcCounter) -> Result<BTreeMap<u16, u64>> {
    PORTS.iter().map(|&p| Ok((p, counter.count(p)?))).collect()
}

fn expected(pairs: &[(u16, u64)]) -> BTreeMap<u16, u64> {
    PORTS
        .iter()
        .map(|&p| {
            let n = pairs.iter().find(|(q, _)| *q == p).map_or(0, |(_, n)| *n);
            (p, n)
        })
        .collect()
}

fn chained(tag: &str, mode: AttachMode, next: Next) -> Result<()> {
    let pins = PinDir::new(&format!("{tag}-counters"))?;
    let mut node = Node::new(&format!("{tag}-node"), NODE_IP)?;
    let client = node.add_pod(&format!("{tag}-c"), Ipv4Addr::new(10, 244, 1, 10))?;
    let server = node.add_pod(&format!("{tag}-s"), Ipv4Addr::new(10, 244, 1, 11))?;

    // The dataplane, programmed and attached as the agent does it.
    let mut f = Fixture::with_mode(tag, Config::DEFAULT, mode)?;
    assert_eq!(f.dp.attach_mode(), mode);
    f.ipcache(&format!("{NODE_IP}/32"), identity::HOST, identity::ANY)?;
    f.ipcache(&format!("{}/32", client.ip), CLIENT.1, identity::ANY)?;
    f.ipcache(&format!("{}/32", server.ip), SERVER.1, identity::ANY)?;
    for (rule, port) in [(1, ALLOWED), (2, INGRESS_DENIED)] {
        f.allow(
            CLIENT.0,
            Direction::Egress,
            SERVER.1,
            proto::UDP,
            port,
            rule,
        )?;
    }
    f.allow(
        SERVER.0,
        Direction::Ingress,
        CLIENT.1,
        proto::UDP,
        ALLOWED,
        3,
    )?;
    f.attach_pod(
        &node,
        &client,
        CLIENT.0,
        CLIENT.1,
        endpoint_flags::EGRESS_ISOLATED,
    )?;
    f.attach_pod(
        &node,
        &server,
        SERVER.0,
        SERVER.1,
        endpoint_flags::INGRESS_ISOLATED,
    )?;

    let egress = Hook {
        ours: FROM_POD,
        pod: &client,
        attach_type: TcAttachType::Ingress,
    };
    let ingress = Hook {
        ours: TO_POD,
        pod: &server,
        attach_type: TcAttachType::Egress,
    };

    // A well-behaved chained program after each of ours.
    let mut after_egress = TcCounter::load(pins.path(), "after_from_pod", TC_ACT_UNSPEC)?;
    let mut after_ingress = TcCounter::load(pins.path(), "after_to_pod", TC_ACT_UNSPEC)?;
    attach_after(
        &node,
        &f,
        &egress,
        after_egress.program(),
        next,
        COUNTER_PRIORITY,
    )?;
    attach_after(
        &node,
        &f,
        &ingress,
        after_ingress.program(),
        next,
        COUNTER_PRIORITY,
    )?;
    for (hook, name, counter) in [
        (&egress, "after_from_pod", &after_egress),
        (&ingress, "after_to_pod", &after_ingress),
    ] {
        assert_eq!(
            chain_of(&node, &f, hook, next, &[(name, counter)])?,
            [hook.ours, name],
            "{mode:?} / {next:?}: our program first, the counter after it"
        );
    }

    let receivers = receivers(&server)?;
    let dropped_before = f.dp.counter(Reason::DroppedPolicy)?;
    let received = round(
        &client,
        &server,
        &receivers,
        &[EGRESS_DENIED, INGRESS_DENIED, ALLOWED],
    )?;
    assert_eq!(received, expected(&[(ALLOWED, SENT)]), "server received");
    assert_eq!(
        f.dp.counter(Reason::DroppedPolicy)? - dropped_before,
        2 * SENT,
        "one port dropped at each hook"
    );
    // Exactly the datagrams each hook allowed reached the program after it.
    assert_eq!(
        counts(&after_egress)?,
        expected(&[(ALLOWED, SENT), (INGRESS_DENIED, SENT)]),
        "{mode:?} / {next:?}: after from_pod"
    );
    assert_eq!(
        counts(&after_ingress)?,
        expected(&[(ALLOWED, SENT)]),
        "{mode:?} / {next:?}: after to_pod"
    );

    // The control: an "ok" between ours and the counters ends the chain there.
    let mut ok_egress = TcCounter::load(pins.path(), "ok_from_pod", TC_ACT_OK)?;
    let mut ok_ingress = TcCounter::load(pins.path(), "ok_to_pod", TC_ACT_OK)?;
    attach_after(
        &node,
        &f,
        &egress,
        ok_egress.program(),
        next,
        STAND_IN_PRIORITY,
    )?;
    attach_after(
        &node,
        &f,
        &ingress,
        ok_ingress.program(),
        next,
        STAND_IN_PRIORITY,
    )?;
    for (hook, names, counters) in [
        (
            &egress,
            ["ok_from_pod", "after_from_pod"],
            [
                ("ok_from_pod", &ok_egress),
                ("after_from_pod", &after_egress),
            ],
        ),
        (
            &ingress,
            ["ok_to_pod", "after_to_pod"],
            [("ok_to_pod", &ok_ingress), ("after_to_pod", &after_ingress)],
        ),
    ] {
        assert_eq!(
            chain_of(&node, &f, hook, next, &counters)?,
            [hook.ours, names[0], names[1]],
            "{mode:?} / {next:?}: ours, the stand-in, the counter"
        );
    }
    let before = (counts(&after_egress)?, counts(&after_ingress)?);
    let received = round(&client, &server, &receivers, &[ALLOWED])?;
    assert_eq!(received, expected(&[(ALLOWED, SENT)]), "server received");
    assert_eq!(
        counts(&ok_egress)?,
        expected(&[(ALLOWED, SENT)]),
        "{mode:?} / {next:?}: our from_pod went on to the stand-in"
    );
    assert_eq!(
        counts(&ok_ingress)?,
        expected(&[(ALLOWED, SENT)]),
        "{mode:?} / {next:?}: our to_pod went on to the stand-in"
    );
    assert_eq!(
        (counts(&after_egress)?, counts(&after_ingress)?),
        before,
        "{mode:?} / {next:?}: the stand-in's TC_ACT_OK ended the chain"
    );
    Ok(())
}

#[test]
fn tcx_allowed_packets_reach_the_next_link() -> Result<()> {
    chained("chain-tcx", AttachMode::Tcx, Next::TcxLink)
}

#[test]
fn clsact_allowed_packets_reach_the_next_filter() -> Result<()> {
    chained("chain-clsact", AttachMode::Clsact, Next::ClsactFilter)
}

/// A CNI still on clsact filters beside our TCX links: the kernel runs the qdisc's filters
/// only when the TCX chain ends in "next".
#[test]
fn tcx_allowed_packets_reach_clsact_filters_behind_the_chain() -> Result<()> {
    chained("chain-mixed", AttachMode::Tcx, Next::ClsactFilter)
}

#[test]
fn the_counter_counts_what_it_is_given() -> Result<()> {
    // The stand-in itself, by test run: so that a counter that never counts cannot pass the
    // tests above by accident of a zero.
    let pins = PinDir::new("chain-unit")?;
    let mut counter = TcCounter::load(pins.path(), "unit_counter", TC_ACT_UNSPEC)?;
    let udp = policy_tests::packet::PacketSpec::udp("10.0.0.1", 40000, "10.0.0.2", ALLOWED);
    let tcp = policy_tests::packet::PacketSpec::tcp("10.0.0.1", 40000, "10.0.0.2", ALLOWED);
    let v6 = policy_tests::packet::PacketSpec::udp("fd00::1", 40000, "fd00::2", ALLOWED);
    for spec in [&udp, &udp, &tcp, &v6] {
        let run = policy_tests::testrun::run(counter.program(), &spec.build(), 0)?;
        ensure!(run.action == TC_ACT_UNSPEC, "action {}", run.action);
    }
    if counter.count(ALLOWED)? != 2 {
        bail!("counted {} IPv4 UDP packets of 2", counter.count(ALLOWED)?);
    }
    Ok(())
}
