//! A dataplane in its own pin directory with helpers to write entries by hand (the tests do
//! not depend on the compiler) and to run programs while checking which counters moved.

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use ipnetwork::IpNetwork;
use policy_agent::compiler::output::{MapDiff, PolicyEntryKey};
use policy_agent::dataplane::{AttachMode, Dataplane};
use policy_common::{Config, Direction, EndpointInfo, IdentityPair, PolicyValue, Reason};

use crate::bpffs::PinDir;
use crate::packet::PacketSpec;
use crate::testrun::{self, Run};
use crate::topology::{Node, Pod};

pub struct Fixture {
    pub dp: Dataplane,
    // Dropped after `dp`: removes the pins.
    _dir: PinDir,
}

/// A POLICY entry allowing destination ports `first..=last`.
pub fn policy_entry(
    endpoint: u32,
    direction: Direction,
    identity: u32,
    protocol: u8,
    first: u16,
    last: u16,
) -> PolicyEntryKey {
    PolicyEntryKey {
        endpoint,
        identity,
        direction,
        protocol,
        first,
        last,
    }
}

impl Fixture {
    pub fn new(tag: &str) -> Result<Fixture> {
        Self::with_config(tag, Config::DEFAULT)
    }

    pub fn with_config(tag: &str, config: Config) -> Result<Fixture> {
        let dir = PinDir::new(tag)?;
        let dp = Dataplane::open(dir.path(), config).context("opening the dataplane")?;
        Ok(Fixture { dp, _dir: dir })
    }

    /// [`Fixture::with_config`] attaching with `mode` rather than the one the kernel version
    /// picks (clsact can be chosen on a kernel that has TCX).
    pub fn with_mode(tag: &str, config: Config, mode: AttachMode) -> Result<Fixture> {
        let dir = PinDir::new(tag)?;
        let dp =
            Dataplane::open_with_mode(dir.path(), config, mode).context("opening the dataplane")?;
        Ok(Fixture { dp, _dir: dir })
    }

    /// Replaces the dataplane with a freshly opened one on the same pins (an agent restart).
    pub fn reopen(&mut self) -> Result<()> {
        let (config, mode) = (self.dp.config(), self.dp.attach_mode());
        self.dp = Dataplane::open_with_mode(self._dir.path(), config, mode)
            .context("reopening the dataplane")?;
        Ok(())
    }

    pub fn endpoint(&mut self, ifindex: u32, id: u32, identity: u32, flags: u32) -> Result<()> {
        self.dp.upsert_endpoint(
            ifindex,
            EndpointInfo {
                id,
                flags,
                generation: 0,
                identity,
            },
        )?;
        Ok(())
    }

    /// Writes `pod`'s endpoint, then attaches the programs to its host veth (from inside the
    /// node namespace, where the name resolves).
    pub fn attach_pod(
        &mut self,
        node: &Node,
        pod: &Pod,
        id: u32,
        identity: u32,
        flags: u32,
    ) -> Result<()> {
        self.endpoint(pod.ifindex, id, identity, flags)?;
        let dp = &mut self.dp;
        node.ns.run(|| dp.attach_endpoint(&pod.host_if))?;
        Ok(())
    }

    /// Attaches `to_network` to a node's uplink.
    pub fn attach_uplink(&mut self, node: &Node, ifname: &str) -> Result<()> {
        let dp = &mut self.dp;
        node.ns.run(|| dp.attach_uplink(ifname))?;
        Ok(())
    }

    /// IPCACHE entry for `cidr` (IPv4 or IPv6).
    pub fn ipcache(&mut self, cidr: &str, identity: u32, cidr_identity: u32) -> Result<()> {
        let pair = IdentityPair {
            identity,
            cidr_identity,
        };
        let mut diff = MapDiff::default();
        match cidr.parse::<IpNetwork>()? {
            IpNetwork::V4(net) => diff.ipcache_v4_upsert.insert(net, pair),
            IpNetwork::V6(net) => diff.ipcache_v6_upsert.insert(net, pair),
        };
        self.dp.apply(&diff)?;
        Ok(())
    }

    pub fn remove_ipcache(&mut self, cidr: &str) -> Result<()> {
        let mut diff = MapDiff::default();
        match cidr.parse::<IpNetwork>()? {
            IpNetwork::V4(net) => diff.ipcache_v4_remove.insert(net),
            IpNetwork::V6(net) => diff.ipcache_v6_remove.insert(net),
        };
        self.dp.apply(&diff)?;
        Ok(())
    }

    pub fn allow_entry(&mut self, key: PolicyEntryKey, rule: u32) -> Result<()> {
        let mut diff = MapDiff::default();
        diff.policy_upsert
            .insert(key, PolicyValue { rule, flags: 0 });
        self.dp.apply(&diff)?;
        Ok(())
    }

    /// Allows exactly `port`.
    pub fn allow(
        &mut self,
        endpoint: u32,
        direction: Direction,
        identity: u32,
        protocol: u8,
        port: u16,
        rule: u32,
    ) -> Result<()> {
        let key = policy_entry(endpoint, direction, identity, protocol, port, port);
        self.allow_entry(key, rule)
    }

    /// Allows `start..=end` (an `endPort` range): one range entry.
    pub fn allow_range(
        &mut self,
        endpoint: u32,
        direction: Direction,
        identity: u32,
        protocol: u8,
        (start, end): (u16, u16),
        rule: u32,
    ) -> Result<()> {
        let key = policy_entry(endpoint, direction, identity, protocol, start, end);
        self.allow_entry(key, rule)
    }

    pub fn revoke(&mut self, key: PolicyEntryKey) -> Result<()> {
        let mut diff = MapDiff::default();
        diff.policy_remove.insert(key);
        self.dp.apply(&diff)?;
        Ok(())
    }

    pub fn service(&mut self, addr: &str) -> Result<()> {
        let mut diff = MapDiff::default();
        diff.services_add.insert(addr.parse()?);
        self.dp.apply(&diff)?;
        Ok(())
    }

    pub fn counters(&self) -> Result<BTreeMap<Reason, u64>> {
        Ok(self.dp.counters()?.into_iter().collect())
    }

    /// Runs `program` on `spec` with `mark`.
    pub fn run(&self, program: &'static str, spec: &PacketSpec, mark: u32) -> Result<Run> {
        self.run_bytes(program, &spec.build(), mark)
    }

    pub fn run_bytes(&self, program: &'static str, bytes: &[u8], mark: u32) -> Result<Run> {
        testrun::run(self.dp.program(program)?, bytes, mark)
    }

    /// Runs `program` on `bytes` and checks that exactly the `reasons` were counted (the
    /// decision path, not only the action) and that the action matches the last one. No
    /// `reasons` is a packet that goes on uncounted.
    pub fn expect_bytes(
        &self,
        program: &'static str,
        bytes: &[u8],
        mark: u32,
        reasons: &[Reason],
    ) -> Result<Run> {
        let before = self.counters()?;
        let run = self.run_bytes(program, bytes, mark)?;
        let after = self.counters()?;
        let mut moved: Vec<Reason> = Vec::new();
        for (reason, n) in &after {
            for _ in before.get(reason).copied().unwrap_or(0)..*n {
                moved.push(*reason);
            }
        }
        let mut expected = reasons.to_vec();
        expected.sort();
        ensure!(
            moved == expected,
            "{program}: counted {moved:?}, expected {expected:?}"
        );
        let last = reasons.last();
        // Allowed packets go on to the next program on the hook; drops end there.
        let want = if last.is_some_and(|r| r.is_drop()) {
            testrun::TC_ACT_SHOT
        } else {
            testrun::TC_ACT_UNSPEC
        };
        ensure!(
            run.action == want,
            "{program}: action {} for {last:?}",
            run.action
        );
        Ok(run)
    }

    pub fn expect(
        &self,
        program: &'static str,
        spec: &PacketSpec,
        mark: u32,
        reasons: &[Reason],
    ) -> Result<Run> {
        self.expect_bytes(program, &spec.build(), mark, reasons)
            .with_context(|| format!("packet {spec:?}"))
    }
}
