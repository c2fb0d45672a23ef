//! Per-packet cost of the tc programs, measured in the kernel with BPF_PROG_TEST_RUN.
//!
//! `cargo xtask bench datapath` runs this (`--json` for one JSON object on stdout).
//!
//! Every scenario runs `from_pod` (the pod's egress) on one IPv4 TCP packet, `--repeat` times
//! per kernel call, and reports the median (and the minimum, which is what remains when other work
//! on a shared machine is left out) of the mean ns per packet over `--rounds` kernel calls in
//! each of `--setups` dataplanes per policy count, pooled. The rounds are interleaved: every
//! setup is loaded side by side and each round times every scenario and reference of every setup
//! once, so that what the ratios and the growth compare was measured over the same stretch of
//! time (`run_interleaved`). Several setups per count, each new maps with their own hash seeds
//! and memory, keep one instance's placement from passing for the cost of a policy count. Calls
//! are short (10,000 packets, about a millisecond) and many, so that most of them fall between
//! the bursts of other work a shared machine has:
//! - floor: a program that only returns what an allowed packet gets, `TC_ACT_UNSPEC` ("go on to
//!   the next program"; `noop`): the test-run harness itself. It returned `TC_ACT_OK` before the
//!   programs did; the constant costs the same, so floors of either kind compare;
//! - established: a packet of a flow already in conntrack;
//! - new_identity / new_cidr / new_port_range: a new flow allowed by a rule naming the peer's
//!   pod identity / an ipBlock containing a non-pod address / an endPort range. "New" is made
//!   real by a conntrack timeout of 0, so every run misses conntrack, judges the flow and writes
//!   its entry;
//! - denied: a new flow no rule allows (every policy probe misses);
//! - new_reported: new_identity with the allowed-flow events on (`events_allowed`, as the agent
//!   runs with its flow record, at the default rate limit): what reporting costs a new flow. No
//!   reader drains the ring buffer here, so past the rate limit and a full buffer this is the
//!   cost of the limiter and of a failed reserve, which is what a flood of new flows pays.
//!
//! References (`ref_*` programs of the object, never loaded by the agent), measured in the same
//! run on the same maps, and each real case reported as a ratio to its reference of unavoidable
//! work: `ct_lookup` (parse + one CONNTRACK lookup; established's reference), `lru_insert`
//! (parse + one CONNTRACK insert), `lpm_lookup` (parse + one IPCACHE_V4 lookup among the loaded
//! prefixes), and `new_flow_*` (parse, CONNTRACK lookup, the peer's identities, one POLICY probe,
//! CONNTRACK insert) on each new-flow scenario's packet. `ratio` is real / reference per policy
//! count; `growth` is each case at 10,000 policies over the same case at 10. Both are paired: a
//! case and its reference at every policy count are timed back to back in each round, and the
//! figure is the median of the round-by-round quotients (`paired`), so a burst that slows one
//! round slows both sides of its quotients.
//!
//! IPv6: `established_v6`, `new_identity_v6` and `new_cidr_v6` are the same flows between the
//! pods' IPv6 addresses (and an IPv6 world prefix carrying the same CIDR identity), allowed by the
//! same POLICY entries, with their references on the same packets.
//!
//! Each is measured with 10, 1,000 and 10,000 POLICY entries spread over 100 endpoints and
//! 4,000 identities, and always 100,000 IPv4 and 100,000 IPv6 CIDR prefixes (/8../32, /16../64)
//! in the IPCACHE besides the pod addresses.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use ipnetwork::{Ipv4Network, Ipv6Network};
use policy_agent::compiler::output::MapDiff;
use policy_common::{
    Config, Direction, IdentityPair, PolicyValue, endpoint_flags, identity,
    program_names::{
        FROM_POD, NOOP, REF_CT_LOOKUP, REF_ENDPOINT, REF_LPM_LOOKUP, REF_LRU_INSERT, REF_NEW_FLOW,
    },
    proto,
};
use policy_tests::{
    fixture::{Fixture, policy_entry},
    packet::{PacketSpec, TCP_ACK},
    testrun::{self, TC_ACT_SHOT, TC_ACT_UNSPEC, TEST_IFINDEX},
};

const POLICY_COUNTS: [usize; 3] = [10, 1_000, 10_000];
const CIDR_PREFIXES: usize = 100_000;

/// The measured endpoint, the one the reference programs key their lookups with.
const EP: u32 = REF_ENDPOINT;
const PEER: u32 = 5000;
const CIDR_ID: u32 = identity::CIDR_MIN + 7;
const ME: &str = "10.0.0.7";
const PEER_ADDR: &str = "10.0.3.9";
/// Inside `WORLD_NET`, which carries CIDR_ID.
const WORLD_ADDR: &str = "203.0.113.77";
const WORLD_NET: &str = "203.0.113.0/24";
const ME6: &str = "fd00:10::7";
const PEER_ADDR6: &str = "fd00:10:3::9";
/// Inside `WORLD_NET6`, which carries CIDR_ID as `WORLD_NET` does.
const WORLD_ADDR6: &str = "2001:db8:77::77";
const WORLD_NET6: &str = "2001:db8:77::/48";

struct Args {
    json: bool,
    repeat: u32,
    rounds: usize,
    /// Dataplanes loaded per policy count (new maps each: their own hash seeds and memory).
    setups: usize,
    /// Only this many policies (one of `POLICY_COUNTS`), for profiling one setup.
    policies: Option<usize>,
    /// Only this scenario (besides the floor), for profiling one path.
    only: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        json: false,
        repeat: 10_000,
        rounds: 45,
        setups: 3,
        policies: None,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--json" => args.json = true,
            "--repeat" => args.repeat = it.next().context("--repeat N")?.parse()?,
            "--rounds" => args.rounds = it.next().context("--rounds N")?.parse()?,
            "--setups" => args.setups = it.next().context("--setups N")?.parse()?,
            "--policies" => {
                let n = it.next().context("--policies N")?.parse()?;
                if !POLICY_COUNTS.contains(&n) {
                    bail!("--policies: one of {POLICY_COUNTS:?}");
                }
                args.policies = Some(n);
            }
            "--only" => args.only = Some(it.next().context("--only SCENARIO")?),
            "-h" | "--help" => {
                println!(
                    "bench_datapath [--json] [--repeat N] [--rounds N] [--setups N] [--policies N] [--only SCENARIO]\n\
                     (--policies and --only are for profiling; they print the text table only)"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if args.rounds == 0 || args.setups == 0 || args.repeat == 0 {
        bail!("--rounds, --setups and --repeat: at least 1");
    }
    Ok(args)
}

/// xorshift64*: deterministic filler, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// 100,000 distinct IPv4 prefixes outside the pod and test ranges, lengths weighted like
/// real CIDR lists (mostly /16../32), each with its own CIDR identity.
fn cidr_prefixes(rng: &mut Rng) -> BTreeMap<Ipv4Network, IdentityPair> {
    let mut out = BTreeMap::new();
    let mut n = 0u32;
    while out.len() < CIDR_PREFIXES {
        let len = match rng.below(10) {
            0 => 8 + rng.below(8) as u8,
            1..=3 => 16 + rng.below(8) as u8,
            4..=7 => 24,
            _ => 25 + rng.below(8) as u8,
        };
        let addr = rng.next() as u32 & (u32::MAX << (32 - len));
        let first = addr >> 24;
        // Keep clear of 10/8 (pods) and 203.0.113/24 (the measured world address).
        if first == 10 || first == 203 || first == 0 {
            continue;
        }
        n += 1;
        let net = Ipv4Network::new(addr.into(), len).expect("valid prefix length");
        out.insert(
            net,
            IdentityPair {
                identity: identity::WORLD,
                cidr_identity: identity::CIDR_MIN + 1000 + n,
            },
        );
    }
    out
}

/// 100,000 distinct IPv6 prefixes (/16../64) in 2000::/4, clear of 2001::/16 (the measured world
/// prefix is in it).
fn cidr_prefixes_v6(rng: &mut Rng) -> BTreeMap<Ipv6Network, IdentityPair> {
    let mut out = BTreeMap::new();
    let mut n = 0u32;
    while out.len() < CIDR_PREFIXES {
        let len = 16 + rng.below(49) as u8;
        let top = 0x2000 | rng.below(0x1000) as u128;
        let addr =
            ((top << 112) | ((rng.next() as u128) << 48)) & (u128::MAX << (128 - len as u32));
        // 2001::/16 holds the measured world prefix.
        if top == 0x2001 {
            continue;
        }
        n += 1;
        let net = Ipv6Network::new(addr.into(), len).expect("valid prefix length");
        out.insert(
            net,
            IdentityPair {
                identity: identity::WORLD,
                cidr_identity: identity::CIDR_MIN + 200_000 + n,
            },
        );
    }
    out
}

/// A dataplane holding `policies` POLICY entries (the measured ones included) and the IPCACHE.
fn setup(
    policies: usize,
    cidrs: &BTreeMap<Ipv4Network, IdentityPair>,
    cidrs6: &BTreeMap<Ipv6Network, IdentityPair>,
) -> Result<Fixture> {
    let mut f = Fixture::new("bench")?;
    f.endpoint(TEST_IFINDEX, EP, 1000, endpoint_flags::EGRESS_ISOLATED)?;
    let mut diff = MapDiff {
        ipcache_v4_upsert: cidrs.clone(),
        ipcache_v6_upsert: cidrs6.clone(),
        ..MapDiff::default()
    };
    let pair = |identity| IdentityPair {
        identity,
        cidr_identity: identity::ANY,
    };
    diff.ipcache_v4_upsert
        .insert(format!("{ME}/32").parse()?, pair(1000));
    diff.ipcache_v4_upsert
        .insert(format!("{PEER_ADDR}/32").parse()?, pair(PEER));
    let world = IdentityPair {
        identity: identity::WORLD,
        cidr_identity: CIDR_ID,
    };
    diff.ipcache_v4_upsert.insert(WORLD_NET.parse()?, world);
    diff.ipcache_v6_upsert
        .insert(format!("{ME6}/128").parse()?, pair(1000));
    diff.ipcache_v6_upsert
        .insert(format!("{PEER_ADDR6}/128").parse()?, pair(PEER));
    diff.ipcache_v6_upsert.insert(WORLD_NET6.parse()?, world);
    // Pod addresses of the other identities.
    for i in 0..4000u32 {
        let addr = std::net::Ipv4Addr::from(0x0a01_0000 + i);
        diff.ipcache_v4_upsert
            .insert(Ipv4Network::new(addr, 32)?, pair(256 + i));
    }

    let value = |rule| PolicyValue { rule, flags: 0 };
    let eg = Direction::Egress;
    // The measured rules.
    diff.policy_upsert
        .insert(policy_entry(EP, eg, PEER, proto::TCP, 80, 80), value(1));
    diff.policy_upsert.insert(
        policy_entry(EP, eg, CIDR_ID, proto::TCP, 443, 443),
        value(2),
    );
    diff.policy_upsert
        .insert(policy_entry(EP, eg, PEER, proto::TCP, 8000, 8099), value(3));
    // Filler: other endpoints and identities, single ports and ranges.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    while diff.policy_upsert.len() < policies {
        let endpoint = 1 + rng.below(100) as u32;
        let direction = if rng.below(2) == 0 {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        let peer = 256 + rng.below(4000) as u32;
        let protocol = [proto::TCP, proto::UDP, proto::SCTP][rng.below(3) as usize];
        let port = 1 + rng.below(65_000) as u16;
        let last = if rng.below(4) == 0 {
            port.saturating_add((1 << rng.below(8)) - 1)
        } else {
            port
        };
        diff.policy_upsert.insert(
            policy_entry(endpoint, direction, peer, protocol, port, last),
            value(10 + diff.policy_upsert.len() as u32),
        );
    }
    f.dp.apply(&diff)?;
    Ok(f)
}

/// Median and minimum over `rounds` of the kernel's mean ns per run.
#[derive(Clone, Copy, Default)]
struct Sample {
    median: f64,
    min: f64,
}

impl Sample {
    fn of(mut samples: Vec<f64>) -> Sample {
        samples.sort_by(f64::total_cmp);
        Sample {
            median: samples[samples.len() / 2],
            min: samples[0],
        }
    }
}

/// Where a measurement's figures go.
#[derive(Clone, Copy)]
enum Kind {
    Floor,
    Case,
    Reference,
}

/// One program timed on one packet in one setup, a kernel call per round.
struct Job {
    kind: Kind,
    name: &'static str,
    policies: usize,
    /// Index of its dataplane in `setups`.
    setup: usize,
    /// Which of the setups of its policy count (0..`--setups`).
    instance: usize,
    program: &'static str,
    spec: PacketSpec,
    packet: Vec<u8>,
    want: i32,
    /// The CONFIG it runs under.
    config: Config,
    samples: Vec<f64>,
}

/// The jobs timed back to back: a case and its reference ([`RATIOS`]) at every policy count, in
/// the setups of one instance index. What a ratio or a growth divides was then measured within
/// a few milliseconds, under the same state of the machine.
fn group_of(job: &Job) -> (&'static str, usize) {
    let family = RATIOS
        .iter()
        .find(|&&(_, reference)| reference == job.name)
        .map_or(job.name, |&(case, _)| case);
    (family, job.instance)
}

/// Runs every job once per round, the rounds interleaved: each round times every group
/// ([`group_of`]) once, the groups in an order shuffled afresh each round (a fixed seed, so every
/// run takes the same orders), each group's jobs one after another. A burst of other work on
/// the machine then lands in one round of some groups rather than in every round of one job, and
/// periodic work cannot keep hitting the same jobs; within a group the jobs share what the burst
/// did, which the paired ratios ([`paired`]) divide out.
fn run_interleaved(setups: &mut [Fixture], jobs: &mut [Job], args: &Args) -> Result<()> {
    let mut groups: BTreeMap<(&'static str, usize), Vec<usize>> = BTreeMap::new();
    for (j, job) in jobs.iter().enumerate() {
        groups.entry(group_of(job)).or_default().push(j);
    }
    let mut order: Vec<Vec<usize>> = groups.into_values().collect();
    let mut rng = Rng(0x005e_ed0f_0dd5_u64);
    for _ in 0..args.rounds {
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for &j in order.iter().flatten() {
            let job = &mut jobs[j];
            let f = &mut setups[job.setup];
            if f.dp.config() != job.config {
                f.dp.set_config(job.config)?;
            }
            let program = f.dp.program(job.program)?;
            let (duration, action) = testrun::time(program, &job.packet, args.repeat)?;
            if action != job.want {
                bail!(
                    "{} at {} policies, {:?}: action {action}, expected {}",
                    job.name,
                    job.policies,
                    job.spec,
                    job.want
                );
            }
            job.samples.push(duration.as_nanos() as f64);
        }
    }
    Ok(())
}

/// The median over every round of every instance of `num[round] / den[round]`, where `num` and
/// `den` are the jobs named so at the given policy counts in the same instance (one group, so
/// each pair was timed back to back).
fn paired(jobs: &[Job], num: (&str, usize), den: (&str, usize)) -> Option<f64> {
    fn named<'a>(
        jobs: &'a [Job],
        (name, policies): (&'a str, usize),
    ) -> impl Iterator<Item = &'a Job> {
        jobs.iter()
            .filter(move |j| j.name == name && j.policies == policies)
    }
    let mut ratios = Vec::new();
    for n in named(jobs, num) {
        if let Some(d) = named(jobs, den).find(|d| d.instance == n.instance) {
            ratios.extend(n.samples.iter().zip(&d.samples).map(|(a, b)| a / b));
        }
    }
    (!ratios.is_empty()).then(|| Sample::of(ratios).median)
}

fn new_flow_config() -> Config {
    let mut config = Config::DEFAULT;
    config.ct_tcp_timeout_s = 0;
    config.ct_tcp_closing_timeout_s = 0;
    config.ct_udp_timeout_s = 0;
    config.ct_sctp_timeout_s = 0;
    config
}

/// The real cases, in the order they are printed.
const CASES: [&str; 9] = [
    "established",
    "new_identity",
    "new_cidr",
    "new_port_range",
    "denied",
    "new_reported",
    "established_v6",
    "new_identity_v6",
    "new_cidr_v6",
];

/// A case not measured in this run (`--only`, `--policies`).
static NOT_MEASURED: BTreeMap<usize, Sample> = BTreeMap::new();

#[derive(Default)]
struct Figures {
    floor: Sample,
    /// Real cases by name ([`CASES`]), then by policy count.
    cases: BTreeMap<&'static str, BTreeMap<usize, Sample>>,
    /// Reference programs by name.
    reference: BTreeMap<&'static str, BTreeMap<usize, Sample>>,
}

/// Each real case and the reference it is a ratio to.
const RATIOS: [(&str, &str); 7] = [
    ("established", "ct_lookup"),
    ("new_identity", "new_flow_identity"),
    ("new_cidr", "new_flow_cidr"),
    ("new_port_range", "new_flow_port_range"),
    ("established_v6", "ct_lookup_v6"),
    ("new_identity_v6", "new_flow_identity_v6"),
    ("new_cidr_v6", "new_flow_cidr_v6"),
];

impl Figures {
    /// The JSON object of one statistic.
    fn json(&self, stat: fn(&Sample) -> f64) -> serde_json::Value {
        let by_count = |m: &BTreeMap<usize, Sample>| {
            serde_json::Value::Object(
                m.iter()
                    .map(|(k, v)| (k.to_string(), serde_json::json!(stat(v))))
                    .collect(),
            )
        };
        let last = POLICY_COUNTS[POLICY_COUNTS.len() - 1];
        let mut out = serde_json::json!({
            "floor": stat(&self.floor),
            "established": stat(&self.case("established")[&last]),
            "established_by_policies": by_count(self.case("established")),
            "reference": serde_json::Value::Object(
                self.reference
                    .iter()
                    .map(|(name, m)| (name.to_string(), by_count(m)))
                    .collect(),
            ),
        });
        for name in CASES.iter().filter(|&&n| n != "established") {
            out[*name] = by_count(self.case(name));
        }
        out
    }

    fn record(&mut self, case: &'static str, policies: usize, sample: Sample) {
        self.cases.entry(case).or_default().insert(policies, sample);
    }

    /// A real case or a reference, by name.
    fn case(&self, name: &str) -> &BTreeMap<usize, Sample> {
        self.cases
            .get(name)
            .or_else(|| self.reference.get(name))
            .unwrap_or(&NOT_MEASURED)
    }
}

/// Each real case over its reference, per policy count: the median of the paired ratios.
fn ratios(jobs: &[Job]) -> BTreeMap<&'static str, BTreeMap<usize, f64>> {
    RATIOS
        .iter()
        .map(|&(case, reference)| {
            let by_count = POLICY_COUNTS
                .iter()
                .filter_map(|&n| Some((n, paired(jobs, (case, n), (reference, n))?)))
                .collect();
            (case, by_count)
        })
        .collect()
}

/// Each case at the most policies over the same case at the fewest: the median of the paired
/// ratios.
fn growth(jobs: &[Job]) -> BTreeMap<&'static str, f64> {
    let (first, last) = (POLICY_COUNTS[0], POLICY_COUNTS[POLICY_COUNTS.len() - 1]);
    CASES
        .into_iter()
        .filter(|&case| case != "new_reported")
        .filter_map(|case| Some((case, paired(jobs, (case, last), (case, first))?)))
        .collect()
}

fn main() -> Result<()> {
    let args = parse_args()?;
    policy_tests::require_root();
    policy_tests::pin_to_cpu(0)?;
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let cidrs = cidr_prefixes(&mut rng);
    let cidrs6 = cidr_prefixes_v6(&mut rng);
    let mut figures = Figures::default();

    let filtered = args.policies.is_some() || args.only.is_some();
    let wanted = |name: &str| args.only.as_deref().is_none_or(|only| only == name);
    let mut setups: Vec<Fixture> = Vec::new();
    let mut jobs: Vec<Job> = Vec::new();
    let instances = POLICY_COUNTS
        .iter()
        .filter(|&&n| args.policies.is_none_or(|p| p == n))
        .flat_map(|&n| (0..args.setups).map(move |i| (n, i)));
    for (policies, instance) in instances {
        eprintln!(
            "loading {policies} policies and {CIDR_PREFIXES} IPv4 and {CIDR_PREFIXES} IPv6 CIDR prefixes (setup {} of {})...",
            instance + 1,
            args.setups
        );
        let mut f = setup(policies, &cidrs, &cidrs6)?;
        // The established flows: recorded now, found by every timed run.
        let flow = PacketSpec::tcp(ME, 40000, PEER_ADDR, 80);
        let flow6 = PacketSpec::tcp(ME6, 40000, PEER_ADDR6, 80);
        for flow in [&flow, &flow6] {
            f.expect(FROM_POD, flow, 0, &[policy_common::Reason::AllowedByPolicy])?;
        }
        let (est, est6) = (flow.flags(TCP_ACK), flow6.flags(TCP_ACK));
        let setup = setups.len();
        let (default, new_flow) = (Config::DEFAULT, new_flow_config());
        let reported = Config {
            events_allowed: 1,
            ..new_flow
        };
        let mut add = |kind, name, program, spec: PacketSpec, want, config| {
            jobs.push(Job {
                kind,
                name,
                policies,
                setup,
                instance,
                program,
                packet: spec.build(),
                spec,
                want,
                config,
                samples: Vec::with_capacity(args.rounds),
            })
        };
        if setups.is_empty() {
            f.dp.load_unpinned(NOOP)?;
            let spec = PacketSpec::tcp(ME, 1, PEER_ADDR, 80);
            add(Kind::Floor, "floor", NOOP, spec, TC_ACT_UNSPEC, default);
        }
        let cases = [
            ("established", est.clone(), TC_ACT_UNSPEC, default),
            ("established_v6", est6.clone(), TC_ACT_UNSPEC, default),
            (
                "new_identity",
                PacketSpec::tcp(ME, 40001, PEER_ADDR, 80),
                TC_ACT_UNSPEC,
                new_flow,
            ),
            (
                "new_cidr",
                PacketSpec::tcp(ME, 40002, WORLD_ADDR, 443),
                TC_ACT_UNSPEC,
                new_flow,
            ),
            (
                "new_port_range",
                PacketSpec::tcp(ME, 40003, PEER_ADDR, 8070),
                TC_ACT_UNSPEC,
                new_flow,
            ),
            (
                "denied",
                PacketSpec::tcp(ME, 40004, PEER_ADDR, 9),
                TC_ACT_SHOT,
                new_flow,
            ),
            (
                "new_identity_v6",
                PacketSpec::tcp(ME6, 40001, PEER_ADDR6, 80),
                TC_ACT_UNSPEC,
                new_flow,
            ),
            (
                "new_cidr_v6",
                PacketSpec::tcp(ME6, 40002, WORLD_ADDR6, 443),
                TC_ACT_UNSPEC,
                new_flow,
            ),
            (
                "new_reported",
                PacketSpec::tcp(ME, 40005, PEER_ADDR, 80),
                TC_ACT_UNSPEC,
                reported,
            ),
        ];
        for (name, spec, want, config) in cases {
            if wanted(name) {
                add(Kind::Case, name, FROM_POD, spec, want, config);
            }
        }
        // The references, on tuples of their own: their inserts must not leave entries the
        // real programs would find.
        if wanted("reference") {
            for name in [REF_CT_LOOKUP, REF_LRU_INSERT, REF_LPM_LOOKUP, REF_NEW_FLOW] {
                f.dp.load_unpinned(name)?;
            }
            let refs = [
                ("ct_lookup", REF_CT_LOOKUP, est),
                (
                    "lru_insert",
                    REF_LRU_INSERT,
                    PacketSpec::tcp(ME, 40011, PEER_ADDR, 80),
                ),
                (
                    "lpm_lookup",
                    REF_LPM_LOOKUP,
                    PacketSpec::tcp(ME, 40012, WORLD_ADDR, 443),
                ),
                (
                    "new_flow_identity",
                    REF_NEW_FLOW,
                    PacketSpec::tcp(ME, 40013, PEER_ADDR, 80),
                ),
                (
                    "new_flow_cidr",
                    REF_NEW_FLOW,
                    PacketSpec::tcp(ME, 40014, WORLD_ADDR, 443),
                ),
                (
                    "new_flow_port_range",
                    REF_NEW_FLOW,
                    PacketSpec::tcp(ME, 40015, PEER_ADDR, 8070),
                ),
                ("ct_lookup_v6", REF_CT_LOOKUP, est6),
                (
                    "new_flow_identity_v6",
                    REF_NEW_FLOW,
                    PacketSpec::tcp(ME6, 40013, PEER_ADDR6, 80),
                ),
                (
                    "new_flow_cidr_v6",
                    REF_NEW_FLOW,
                    PacketSpec::tcp(ME6, 40014, WORLD_ADDR6, 443),
                ),
            ];
            for (name, program, spec) in refs {
                add(Kind::Reference, name, program, spec, TC_ACT_UNSPEC, default);
            }
        }
        setups.push(f);
    }
    eprintln!(
        "timing {} programs x {} rounds, interleaved...",
        jobs.len(),
        args.rounds
    );
    run_interleaved(&mut setups, &mut jobs, &args)?;
    let (ratio, growth) = (ratios(&jobs), growth(&jobs));
    // The rounds of every setup of a policy count, pooled.
    let mut pooled: BTreeMap<(&'static str, usize), (Kind, Vec<f64>)> = BTreeMap::new();
    for job in jobs {
        let (_, samples) = pooled
            .entry((job.name, job.policies))
            .or_insert((job.kind, Vec::new()));
        samples.extend(job.samples);
    }
    for ((name, policies), (kind, samples)) in pooled {
        let sample = Sample::of(samples);
        match kind {
            Kind::Floor => figures.floor = sample,
            Kind::Case => figures.record(name, policies, sample),
            Kind::Reference => {
                figures
                    .reference
                    .entry(name)
                    .or_default()
                    .insert(policies, sample);
            }
        }
    }

    if filtered {
        let cell = |s: &Sample| format!("{:.0} ({:.0})", s.median, s.min);
        println!("ns per packet, median (min)");
        println!("{:<16}{}", "floor (noop)", cell(&figures.floor));
        for name in CASES {
            let table = figures.case(name);
            for (policies, sample) in table {
                println!("{name:<16}{policies:>6} policies  {}", cell(sample));
            }
        }
        return Ok(());
    }

    if args.json {
        // The figures asked for are medians; the minimums ride along under "min".
        let mut out = figures.json(|s| s.median);
        out["min"] = figures.json(|s| s.min);
        out["ratio"] = serde_json::json!(ratio);
        out["growth"] = serde_json::json!(growth);
        out["cidr_prefixes"] = serde_json::json!(CIDR_PREFIXES);
        out["unit"] = serde_json::json!("ns/packet");
        println!("{out}");
    } else {
        println!(
            "ns per packet, median (min) of {} setups x {} interleaved kernel runs x {} packets; {CIDR_PREFIXES} IPv4 and {CIDR_PREFIXES} IPv6 CIDR prefixes loaded",
            args.setups, args.rounds, args.repeat
        );
        println!("{:<16}{:>14}{:>14}{:>14}", "policies", 10, 1000, 10000);
        let cell = |s: &Sample| format!("{:.0} ({:.0})", s.median, s.min);
        println!("{:<16}{:>14}", "floor (noop)", cell(&figures.floor));
        for name in CASES {
            let table = figures.case(name);
            print!("{name:<16}");
            for count in POLICY_COUNTS {
                print!("{:>14}", cell(&table[&count]));
            }
            println!();
        }
        print!("{:<16}", "reported/new");
        for count in POLICY_COUNTS {
            let ratio = figures.case("new_reported")[&count].median
                / figures.case("new_identity")[&count].median;
            print!("{:>14}", format!("{ratio:.2}"));
        }
        println!();
        println!("references (unavoidable work)");
        for (name, table) in &figures.reference {
            print!("{name:<22}");
            for count in POLICY_COUNTS {
                print!("{:>14}", cell(&table[&count]));
            }
            println!();
        }
        println!("ratio, real / reference (median of the paired ratios)");
        for (case, by_count) in &ratio {
            print!("{case:<22}");
            for count in POLICY_COUNTS {
                print!("{:>14}", format!("{:.2}", by_count[&count]));
            }
            println!();
        }
        let growth: Vec<String> = growth
            .iter()
            .map(|(case, g)| format!("{case} {g:.2}"))
            .collect();
        println!("growth 10 -> 10,000 policies: {}", growth.join(", "));
    }
    Ok(())
}
