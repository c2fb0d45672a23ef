//! The first end-to-end kernel scenario, shared by the `smoke` binary (the README's main job until
//! the lab) and the `foundation` test: a pod isolated for ingress with one rule allowing TCP/80.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use policy_agent::{compiler::output::MapDiff, dataplane::Dataplane};
use policy_common::{
    Config, Direction, EndpointInfo, PolicyValue, endpoint_flags, identity, proto,
};

use crate::{
    bpffs::PinDir,
    netns::ifindex,
    pod::{NodeWithPod, TcpResponder, tcp_connects},
};

pub struct Outcome {
    pub port_80_connected: bool,
    pub port_81_connected: bool,
}

/// Builds a node and a pod namespace, attaches the programs to the pod's host veth, writes an
/// ENDPOINTS entry (ingress isolated) and one POLICY entry (any peer, TCP/80), then dials TCP/80
/// and TCP/81 from the node's namespace. `report` receives a line per step.
pub fn allow_80_deny_81(report: &mut dyn FnMut(String)) -> Result<Outcome> {
    let lab = NodeWithPod::create("first", 250)?;
    let _servers = TcpResponder::start(&lab.pod, &[80, 81])?;
    report(format!(
        "namespaces {} (node) and {} (pod); pod address {}",
        lab.node.name(),
        lab.pod.name(),
        lab.pod_ip
    ));
    let pins = PinDir::new("first")?;
    let _dataplane = lab.node.run(|| -> Result<Dataplane> {
        let mut dp = Dataplane::open(pins.path(), Config::default())?;
        dp.attach_endpoint(&lab.host_if)?;
        let ep = 1;
        let mut diff = MapDiff::default();
        diff.policy_upsert.insert(
            crate::fixture::policy_entry(ep, Direction::Ingress, identity::ANY, proto::TCP, 80, 80),
            PolicyValue { rule: 1, flags: 0 },
        );
        dp.apply(&diff)?;
        dp.upsert_endpoint(
            ifindex(&lab.host_if)?,
            EndpointInfo {
                id: ep,
                flags: endpoint_flags::INGRESS_ISOLATED,
                generation: 0,
                identity: identity::POD_MIN,
            },
        )?;
        Ok(dp)
    })?;
    report(format!(
        "attached to {}; pod isolated for ingress; one rule: allow TCP/80 from any peer",
        lab.host_if
    ));
    let timeout = Duration::from_millis(500);
    let dial = |port| tcp_connects(&lab.node, SocketAddr::from((lab.pod_ip, port)), timeout);
    Ok(Outcome {
        port_80_connected: dial(80)?,
        port_81_connected: dial(81)?,
    })
}
