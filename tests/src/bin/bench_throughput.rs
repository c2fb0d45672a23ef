//! Throughput between pods, same node and across nodes, for four enforcers measured in one run:
//! none; the hooks alone (a pass-through program wherever the agent attaches one); policy-agent
//! with N policies; and an nftables ruleset implementing the same N policies.
//!
//! The hooks alone split what enforcement adds per connection in two: the tc machinery that
//! runs a program at each hook, which any tc dataplane pays (hooks − none), and the work of our
//! programs and maps (ours − hooks).
//!
//! New connections per second: one 1-byte request and reply per connection, client closes with
//! SO_LINGER 0 so that TIME_WAIT does not exhaust ephemeral ports. Bulk: iperf3.
//!
//! Usage: bench_throughput [--policies N] [--seconds S] [--rounds R] [--crr-only] [--json]

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::programs::TcAttachType;
use policy_tests::{
    agent::{self, write_revision},
    bpffs::PinDir,
    cluster::{Cluster, node_ip},
    netns::NetNs,
    require_root, tc_counter,
    workload::{self, PODS},
};
use serde_json::json;

const CRR_PORT: u16 = 5202;
const STREAM_PORT: u16 = 5201;
/// How long the enforcer's processes are watched without traffic.
const IDLE_SECONDS: f64 = 2.0;

struct Opts {
    policies: usize,
    seconds: f64,
    json: bool,
    /// Only same-node new connections (the policy-count sweep).
    crr_only: bool,
    /// Rounds of none / nftables / ours; figures are medians.
    rounds: usize,
}

fn opts() -> Result<Opts> {
    let mut o = Opts {
        policies: 1000,
        seconds: 3.0,
        json: false,
        crr_only: false,
        rounds: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--policies" => o.policies = args.next().context("--policies N")?.parse()?,
            "--seconds" => o.seconds = args.next().context("--seconds S")?.parse()?,
            "--json" => o.json = true,
            "--crr-only" => o.crr_only = true,
            "--rounds" => o.rounds = args.next().context("--rounds N")?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(o)
}

/// Accepts connections in `ns`: reads one byte, answers one byte, closes.
fn crr_server(ns: &NetNs) -> Result<()> {
    let listener = ns.run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, CRR_PORT)))?;
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut b = [0u8; 1];
            if conn.read_exact(&mut b).is_ok() {
                let _ = conn.write_all(&b);
            }
        }
    });
    Ok(())
}

fn linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Completed request/reply connections from `ns` to `dst` for `seconds`: how many, and per
/// second.
fn crr(ns: &NetNs, dst: Ipv4Addr, seconds: f64) -> Result<(u64, f64)> {
    ns.run(|| {
        let addr = SocketAddr::from((dst, CRR_PORT));
        let deadline = Duration::from_secs_f64(seconds);
        let start = Instant::now();
        let (mut ok, mut failed) = (0u64, 0u64);
        while start.elapsed() < deadline {
            let done = (|| -> std::io::Result<()> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                s.write_all(&[1])?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)?;
                linger_zero(&s);
                Ok(())
            })();
            if done.is_ok() { ok += 1 } else { failed += 1 }
        }
        if failed > 0 && ok == 0 {
            bail!("no connection to {addr} succeeded");
        }
        Ok((ok, ok as f64 / start.elapsed().as_secs_f64()))
    })
}

/// CPU time (user + system, all threads) the processes `pids` have used so far, in µs, from
/// `/proc/<pid>/stat` (clock-tick resolution).
fn cpu_us(pids: &[u32]) -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut ticks = 0u64;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The fields after the command name (which may hold spaces) in parentheses; utime and
        // stime are the 14th and 15th fields of the line, the 12th and 13th after it.
        let rest = stat.rsplit_once(')').context("/proc/<pid>/stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        for i in [11, 12] {
            ticks += fields.get(i).context("utime/stime")?.parse::<u64>()?;
        }
    }
    Ok(ticks as f64 / ticks_per_s * 1e6)
}

/// iperf3 bulk TCP throughput in Gbit/s.
fn stream(ns: &NetNs, dst: Ipv4Addr, seconds: f64) -> Result<f64> {
    let out = ns.exec(
        "iperf3",
        &[
            "-c",
            &dst.to_string(),
            "-p",
            &STREAM_PORT.to_string(),
            "-t",
            &format!("{seconds}"),
            "-J",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 JSON without end.sum_received.bits_per_second")
}

#[derive(Default, Clone, Copy)]
struct Figures {
    crr_same: f64,
    crr_cross: f64,
    stream_same: f64,
    stream_cross: f64,
    /// CPU time of the enforcer's own processes per new connection (µs).
    enforcer_cpu_us: f64,
    /// CPU time of the same processes per second without traffic (ms), measured right after.
    enforcer_idle_cpu_ms_per_s: f64,
}

impl Figures {
    /// Field-wise median.
    fn median(all: &[Figures]) -> Figures {
        let med = |f: fn(&Figures) -> f64| {
            let mut v: Vec<f64> = all.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        Figures {
            crr_same: med(|f| f.crr_same),
            crr_cross: med(|f| f.crr_cross),
            stream_same: med(|f| f.stream_same),
            stream_cross: med(|f| f.stream_cross),
            enforcer_cpu_us: med(|f| f.enforcer_cpu_us),
            enforcer_idle_cpu_ms_per_s: med(|f| f.enforcer_idle_cpu_ms_per_s),
        }
    }
}

/// The figures with the enforcer in place; `enforcer` are its own processes (the agents), whose
/// CPU time per connection is measured over the new-connection runs.
fn measure(cluster: &Cluster, o: &Opts, enforcer: &[u32]) -> Result<Figures> {
    let a = &cluster.pod("a").netns;
    let (b, c) = (cluster.pod("b").ip, cluster.pod("c").ip);
    let seconds = o.seconds;
    crr(a, b, 0.2)?; // warm up (ARP, conntrack, JIT caches)
    let cpu_before = cpu_us(enforcer)?;
    let (same_n, crr_same) = crr(a, b, seconds)?;
    let (cross_n, crr_cross) = if o.crr_only {
        (0, 0.0)
    } else {
        crr(a, c, seconds)?
    };
    let connections = (same_n + cross_n).max(1) as f64;
    let enforcer_cpu_us = (cpu_us(enforcer)? - cpu_before) / connections;
    // The same processes with no traffic for a while: what they spend whatever the load.
    let idle = if enforcer.is_empty() {
        0.0
    } else {
        let before = cpu_us(enforcer)?;
        std::thread::sleep(Duration::from_secs_f64(IDLE_SECONDS));
        (cpu_us(enforcer)? - before) / IDLE_SECONDS
    };
    let enforcer_idle_cpu_ms_per_s = idle / 1e3;
    if o.crr_only {
        return Ok(Figures {
            crr_same,
            enforcer_cpu_us,
            enforcer_idle_cpu_ms_per_s,
            ..Figures::default()
        });
    }
    Ok(Figures {
        crr_same,
        crr_cross,
        enforcer_cpu_us,
        enforcer_idle_cpu_ms_per_s,
        stream_same: stream(a, b, seconds)?,
        stream_cross: stream(a, c, seconds)?,
    })
}

fn with_nftables(cluster: &Cluster, rules: &[workload::Rule], o: &Opts) -> Result<Figures> {
    let table = "pa_bench";
    for node in &cluster.nodes {
        let ruleset =
            workload::nft_ruleset(table, node.index, PODS, rules, |pod| format!("veth{pod}"));
        let file = std::env::temp_dir().join(format!("{}-{}.nft", cluster.prefix, node.index));
        std::fs::write(&file, ruleset)?;
        node.netns.exec("nft", &["-f", &file.to_string_lossy()])?;
        let _ = std::fs::remove_file(&file);
    }
    let figures = measure(cluster, o, &[]);
    for node in &cluster.nodes {
        node.netns
            .exec("nft", &["delete", "table", "inet", table])?;
    }
    figures
}

/// A pass-through program on every hook the agent attaches to: both directions of each pod's
/// host veth and the egress of each node's uplink (the agent's `to_network`), in the attach mode
/// the agent picks on this kernel (aya's default: TCX links where the kernel has them).
fn with_hooks(cluster: &Cluster, o: &Opts) -> Result<Figures> {
    let pins = PinDir::new("bt-pass")?;
    let mut program = tc_counter::pass_through(pins.path(), "pass_through")?;
    for node in &cluster.nodes {
        let mut hooks: Vec<(&str, TcAttachType)> = Vec::new();
        for pod in cluster.pods.iter().filter(|p| p.node == node.index) {
            hooks.push((&pod.host_if, TcAttachType::Ingress));
            hooks.push((&pod.host_if, TcAttachType::Egress));
        }
        hooks.push((&node.uplink, TcAttachType::Egress));
        node.netns.run(|| -> Result<()> {
            for (ifname, attach_type) in hooks {
                program
                    .attach(ifname, attach_type)
                    .with_context(|| format!("attaching the pass-through program to {ifname}"))?;
            }
            Ok(())
        })?;
    }
    let figures = measure(cluster, o, &[]);
    // Dropping the program closes its links: the hooks are empty again.
    drop(program);
    figures
}

fn with_agent(
    cluster: &Cluster,
    rules: &[workload::Rule],
    o: &Opts,
) -> Result<(Figures, Duration)> {
    let dir = std::env::temp_dir().join(format!("{}-manifests", cluster.prefix));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("cluster.yaml"),
        workload::manifests(PODS, rules, node_ip),
    )?;
    write_revision(&dir, 1)?;
    let (agents, converge) = agent::start_all(cluster, &dir, 1)?;
    let pids: Vec<u32> = agents.iter().map(|a| a.child.id()).collect();
    let figures = measure(cluster, o, &pids);
    drop(agents);
    let _ = std::fs::remove_dir_all(&dir);
    Ok((figures?, converge))
}

fn main() -> Result<()> {
    require_root();
    let o = opts()?;
    let mut cluster = workload::cluster("bt")?;
    for server in ["b", "c"] {
        crr_server(&cluster.pod(server).netns)?;
        let ns = cluster.pod(server).netns.name().to_owned();
        cluster.spawn_in(&ns, "iperf3", &["-s", "-p", &STREAM_PORT.to_string()])?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let rules = workload::policies(o.policies, (STREAM_PORT, CRR_PORT));

    // The four enforcers take turns, round after round, and each figure is the median over the
    // rounds: load from elsewhere on a shared 2-core machine then hits them alike. Each round
    // starts one enforcer further along, so that none always runs first, or always right after
    // the same other one (whose teardown, an agent's or a ruleset's, it would inherit).
    let (mut nones, mut hookss, mut nfts, mut ourss) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut converge = Duration::ZERO;
    for round in 0..o.rounds {
        for turn in 0..4 {
            match (round + turn) % 4 {
                0 => nones.push(measure(&cluster, &o, &[])?),
                1 => hookss.push(with_hooks(&cluster, &o)?),
                2 => nfts.push(with_nftables(&cluster, &rules, &o)?),
                _ => {
                    let (f, c) = with_agent(&cluster, &rules, &o)?;
                    ourss.push(f);
                    converge = converge.max(c);
                }
            }
        }
        eprintln!(
            "round {}: none {:.0}, hooks {:.0}, nftables {:.0}, ours {:.0} conn/s (same node)",
            round + 1,
            nones[round].crr_same,
            hookss[round].crr_same,
            nfts[round].crr_same,
            ourss[round].crr_same
        );
    }
    let (none, hooks, nft, ours) = (
        Figures::median(&nones),
        Figures::median(&hookss),
        Figures::median(&nfts),
        Figures::median(&ourss),
    );

    let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { 0.0 };
    // Connections run one after another, so a rate's inverse is the time one connection takes:
    // what enforcement adds per connection is the difference of those times.
    let added_us = |with: f64, without: f64| {
        if with > 0.0 && without > 0.0 {
            (1.0 / with - 1.0 / without) * 1e6
        } else {
            0.0
        }
    };
    let fig = |f: Figures| {
        json!({"crr_same_node": f.crr_same, "crr_cross_node": f.crr_cross,
               "stream_gbps_same_node": f.stream_same, "stream_gbps_cross_node": f.stream_cross})
    };
    let out = json!({
        "policies": o.policies,
        "seconds": o.seconds,
        "rounds": o.rounds,
        "none": fig(none), "hooks": fig(hooks), "ours": fig(ours), "nft": fig(nft),
        "agent_initial_enforce_ms": converge.as_secs_f64() * 1e3,
        "added_us_per_connection": {
            "same_node": added_us(ours.crr_same, none.crr_same),
            "cross_node": added_us(ours.crr_cross, none.crr_cross),
        },
        // The split of the above: the hooks themselves, and our programs on top of them.
        "hooks_us_per_connection": {
            "same_node": added_us(hooks.crr_same, none.crr_same),
            "cross_node": added_us(hooks.crr_cross, none.crr_cross),
        },
        "programs_us_per_connection": {
            "same_node": added_us(ours.crr_same, hooks.crr_same),
            "cross_node": added_us(ours.crr_cross, hooks.crr_cross),
        },
        // The agents' own CPU (user space and the syscalls they make) per new connection, over
        // the new-connection runs: part of what enforcement costs, though not on the
        // connection's path.
        "agent_cpu_us_per_connection": ours.enforcer_cpu_us,
        // What they spend without traffic (timers, the manifest poll, the periodic map count),
        // both agents together: the part of the above that is not per connection.
        "agent_idle_cpu_ms_per_s": ours.enforcer_idle_cpu_ms_per_s,
        "crr_ratio_vs_none": ratio(ours.crr_same + ours.crr_cross, none.crr_same + none.crr_cross),
        "crr_ratio_vs_hooks": ratio(ours.crr_same + ours.crr_cross, hooks.crr_same + hooks.crr_cross),
        "crr_ratio_hooks_vs_none": ratio(hooks.crr_same + hooks.crr_cross, none.crr_same + none.crr_cross),
        "crr_ratio_vs_nft": ratio(ours.crr_same + ours.crr_cross, nft.crr_same + nft.crr_cross),
        "stream_ratio_vs_none": ratio(ours.stream_same + ours.stream_cross, none.stream_same + none.stream_cross),
        "stream_ratio_vs_nft": ratio(ours.stream_same + ours.stream_cross, nft.stream_same + nft.stream_cross),
    });
    if o.json {
        println!("{out}");
    } else {
        println!("{} policies, {}s per measurement", o.policies, o.seconds);
        println!(
            "{:<10} {:>14} {:>14} {:>12} {:>12}",
            "enforcer", "conn/s same", "conn/s cross", "Gb/s same", "Gb/s cross"
        );
        for (name, f) in [
            ("none", none),
            ("hooks", hooks),
            ("ours", ours),
            ("nftables", nft),
        ] {
            println!(
                "{name:<10} {:>14.0} {:>14.0} {:>12.2} {:>12.2}",
                f.crr_same, f.crr_cross, f.stream_same, f.stream_cross
            );
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
