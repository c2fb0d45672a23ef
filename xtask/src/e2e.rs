//! `cargo xtask e2e`: the upstream Kubernetes NetworkPolicy e2e suite against the agent installed
//! as its users install it, on a cluster of real components on this machine.
//!
//! The cluster is the lab's real-API mode with real nodes (`lab up --api kube --kubelet`): etcd,
//! kube-apiserver, kube-controller-manager and kube-scheduler in a control-plane namespace, and on
//! each of two node namespaces containerd, a kubelet and kube-proxy. The agent comes from
//! `kubectl apply -k deploy/overlays/<flavor>` with the overlay unchanged: its image,
//! `policy-agent:dev`, is already in every node's containerd (as `kind load docker-image` puts it
//! there), and `kubectl rollout status` waits until every agent passed its readiness probe.
//! Then `ginkgo --focus=Netpol --skip=Feature:SCTPConnectivity` runs `e2e.test`, both built from
//! the pinned Kubernetes module, as the kind workflow runs the released binaries. The JUnit
//! report is kept in `target/e2e/<flavor>/`; every Netpol spec that did not run is listed with
//! its reason.

use std::{path::Path, process::Stdio, time::Instant};

use anyhow::{Context, Result, bail};

use crate::{
    kube,
    lab::{self, AgentChoice, Lab, UpOptions, kube as labkube},
    workspace_root,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// `kind`: kindnet's ptp chain and kube-proxy in iptables mode, overlay deploy/overlays/kind.
    /// `k3s`: flannel's bridge on cni0 and kube-proxy in nftables mode, overlay deploy/overlays/k3s.
    #[arg(long, value_enum, default_value_t = Flavor::Kind)]
    pub flavor: Flavor,
    /// ginkgo's --focus.
    #[arg(long, default_value = "Netpol")]
    pub focus: String,
    /// ginkgo's --skip. This kernel has no SCTP sockets; a plain "SCTP" would also skip two TCP
    /// specs whose names mention SCTP.
    #[arg(long, default_value = "Feature:SCTPConnectivity")]
    pub skip: String,
    /// Parallel ginkgo processes.
    #[arg(long, default_value_t = 6)]
    pub procs: u32,
    /// The lab's prefix.
    #[arg(long, default_value = "e2e")]
    pub prefix: String,
    /// Leave the cluster up afterwards (`cargo xtask lab --prefix e2e down` removes it).
    #[arg(long)]
    pub keep: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Flavor {
    Kind,
    K3s,
}

impl Flavor {
    fn name(self) -> &'static str {
        match self {
            Flavor::Kind => "kind",
            Flavor::K3s => "k3s",
        }
    }
}

pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    // `cargo xtask e2e` ran setup: the binaries are built.
    let node_bins = kube::NODE.find()?;
    let report_dir = workspace_root()
        .join("target")
        .join("e2e")
        .join(args.flavor.name());
    let _ = std::fs::remove_dir_all(&report_dir);
    std::fs::create_dir_all(&report_dir)?;
    lab::down(&args.prefix)?;
    let (proxy, cni) = match args.flavor {
        Flavor::Kind => (labkube::ProxyMode::Iptables, labkube::CniShape::Ptp),
        Flavor::K3s => (labkube::ProxyMode::Nftables, labkube::CniShape::Bridge),
    };
    let mut lab = Lab::up(
        &args.prefix,
        &UpOptions {
            nodes: 2,
            agent: AgentChoice::Build,
            api: labkube::ApiMode::Kube,
            kube_proxy: proxy,
            cni,
            kubelet: true,
            ip_family: Default::default(),
        },
    )?;
    println!(
        "e2e: cluster up in {:.0} s: kube-apiserver {}, 2 nodes with kubelet and containerd, kube-proxy in {} mode",
        started.elapsed().as_secs_f64(),
        lab.server_version(),
        proxy.as_str()
    );
    let outcome = (|| -> Result<Summary> {
        install(&mut lab, args.flavor)?;
        new_pods(&lab)?;
        let summary = suite(&lab, args, &node_bins, &report_dir)?;
        let attach = lab.cni_attach_totals()?;
        println!(
            "e2e: policy-agent-cni: {} pod sandboxes enforced before their first packet, {:.1} ms added on average",
            attach.1,
            attach.0 * 1e3 / attach.1.max(1) as f64
        );
        Ok(summary)
    })();
    if !args.keep {
        drop(lab);
        let removed = lab::down(&args.prefix)?;
        println!("e2e: cluster removed ({})", removed.summary());
        let left = lab::node_cgroups_left(&args.prefix);
        if !left.is_empty() {
            bail!("lab down left the nodes' cgroups behind: {left:?}");
        }
    }
    let summary = outcome?;
    println!(
        "e2e: {} in {:.0} s in all; JUnit report in {}",
        summary.line,
        started.elapsed().as_secs_f64(),
        report_dir.display()
    );
    if !summary.success {
        bail!("the upstream NetworkPolicy suite failed: {}", summary.line);
    }
    Ok(())
}

/// `kubectl apply -k deploy/overlays/<flavor>`, then the rollout and the agents' readiness.
fn install(lab: &mut Lab, flavor: Flavor) -> Result<()> {
    let t = Instant::now();
    let overlay = workspace_root()
        .join("deploy")
        .join("overlays")
        .join(flavor.name());
    let out = lab
        .kubectl(&["apply", "-k", &overlay.display().to_string()], None)
        .with_context(|| format!("kubectl apply -k {}", overlay.display()))?;
    print!("{out}");
    let rollout = lab.kubectl(
        &[
            "-n",
            "policy-agent",
            "rollout",
            "status",
            "daemonset/policy-agent",
            "--timeout=5m",
        ],
        None,
    );
    let pods = lab.kubectl(&["-n", "policy-agent", "get", "pods", "-o", "wide"], None)?;
    print!("{pods}");
    if let Err(e) = rollout {
        let described = lab
            .kubectl(&["-n", "policy-agent", "describe", "pods"], None)
            .unwrap_or_default();
        bail!("the DaemonSet did not roll out: {e:#}\n{described}");
    }
    println!(
        "e2e: policy-agent rolled out and Ready on every node in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Pods that send from their first instant ([`Lab::first_packets`]): under default-deny egress
/// nothing may pass; without policy the datagrams must arrive (the receiver hears pods).
fn new_pods(lab: &Lab) -> Result<()> {
    let t = Instant::now();
    let f = lab.first_packets()?;
    println!(
        "e2e: new pods sending from their first instant: default-deny egress {} of {} datagrams passed, \
         no policy {} of {} arrived ({:.0} s)",
        f.denied_passed,
        f.sent,
        f.open_arrived,
        f.sent,
        t.elapsed().as_secs_f64()
    );
    if f.open_arrived == 0 {
        bail!("no datagram of the unrestricted pod reached ext: the check cannot see leaks");
    }
    if f.denied_passed > 0 {
        bail!(
            "{} datagrams of a new pod under default-deny egress passed before its endpoint was enforced",
            f.denied_passed
        );
    }
    Ok(())
}

struct Summary {
    line: String,
    success: bool,
}

fn suite(lab: &Lab, args: &Args, bins: &kube::Binaries, report_dir: &Path) -> Result<Summary> {
    let pattern = |flag: &str, re: &str| {
        regex::Regex::new(re)
            .with_context(|| format!("--{flag} {re:?} is not a regular expression"))
    };
    let (focus, skip) = (pattern("focus", &args.focus)?, pattern("skip", &args.skip)?);
    let log = report_dir.join("ginkgo.log");
    let out = std::fs::File::create(&log)?;
    let mut cmd = lab.control_plane_command(&bins.path("ginkgo"))?;
    cmd.env("KUBERNETES_CONFORMANCE_TEST", "y")
        .arg(format!("--nodes={}", args.procs))
        .arg(format!("--focus={}", args.focus))
        .arg(format!("--skip={}", args.skip))
        .arg("--no-color")
        .arg("--junit-report=junit.xml")
        .arg(format!("--output-dir={}", report_dir.display()))
        .arg(bins.path("e2e.test"))
        .arg("--")
        .arg("--provider=local")
        .arg("--dump-logs-on-failure=false")
        .arg("--disable-log-dump=true")
        .arg(format!("--report-dir={}", report_dir.display()))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    println!(
        "e2e: ginkgo --focus={:?} --skip={:?} with {} processes (log: {})",
        args.focus,
        args.skip,
        args.procs,
        log.display()
    );
    let t = Instant::now();
    let status = cmd.status().context("running ginkgo")?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    for line in summary_lines(&text) {
        println!("{line}");
    }
    let junit = report_dir.join("junit.xml");
    let report = std::fs::read_to_string(&junit)
        .with_context(|| format!("ginkgo wrote no JUnit report ({})", junit.display()))?;
    let cases = junit_cases(&report);
    let tally = Tally::of(&cases, &focus, &skip);
    for c in &tally.by_skip {
        println!(
            "not run (--skip): {} — {}",
            c.name,
            c.skipped.as_deref().unwrap_or_default()
        );
    }
    for c in &tally.at_run_time {
        println!(
            "NOT RUN, skipped at run time: {} — {}",
            c.name,
            c.skipped.as_deref().unwrap_or_default()
        );
    }
    let failed: Vec<&Case> = cases.iter().filter(|c| c.failed).collect();
    for c in &failed {
        println!("FAILED: {}", c.name);
    }
    let (ran, not_run, at_run_time) = (
        tally.ran,
        tally.by_skip.len() + tally.at_run_time.len(),
        tally.at_run_time.len(),
    );
    Ok(Summary {
        line: format!(
            "{ran} Netpol specs ran, {} failed, {not_run} not run ({at_run_time} of them skipped at run time), in {:.0} s (ginkgo exit {})",
            failed.len(),
            t.elapsed().as_secs_f64(),
            status.code().unwrap_or(-1)
        ),
        success: status.success() && failed.is_empty() && ran > 0 && at_run_time == 0,
    })
}

/// The focused specs of a report: how many ran, which `--skip` left out, and which were skipped
/// at run time (a feature the cluster lacks, a failed precondition) — the last fail the run.
struct Tally<'a> {
    ran: usize,
    by_skip: Vec<&'a Case>,
    at_run_time: Vec<&'a Case>,
}

impl<'a> Tally<'a> {
    fn of(cases: &'a [Case], focus: &regex::Regex, skip: &regex::Regex) -> Tally<'a> {
        let mut t = Tally {
            ran: 0,
            by_skip: Vec::new(),
            at_run_time: Vec::new(),
        };
        for c in cases.iter().filter(|c| focus.is_match(&c.name)) {
            match (&c.skipped, skip.is_match(&c.name)) {
                (None, _) => t.ran += 1,
                (Some(_), true) => t.by_skip.push(c),
                (Some(_), false) => t.at_run_time.push(c),
            }
        }
        t
    }
}

/// ginkgo's closing lines: `Ran 45 of 7144 Specs in …`, `SUCCESS!`/`FAIL!`, the counts.
fn summary_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("Ran ")
                || l.starts_with("SUCCESS!")
                || l.starts_with("FAIL!")
                || l.contains(" Passed | ")
                || l.starts_with("Ginkgo ran ")
                || l.starts_with("Test Suite ")
        })
        .collect()
}

/// A spec of the JUnit report.
#[derive(Debug, PartialEq)]
struct Case {
    name: String,
    /// The `<skipped message>`, for specs that did not run.
    skipped: Option<String>,
    failed: bool,
}

/// The `<testcase>` elements of a ginkgo JUnit report (name, skipped message, failure).
fn junit_cases(xml: &str) -> Vec<Case> {
    let attr = |tag: &str, key: &str| -> Option<String> {
        let start = tag.find(&format!(" {key}=\""))? + key.len() + 3;
        let end = tag[start..].find('"')? + start;
        Some(unescape(&tag[start..end]))
    };
    let mut cases = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<testcase ") {
        rest = &rest[i..];
        let open_end = rest.find('>').unwrap_or(rest.len());
        let open = &rest[..open_end];
        let (body, next) = if open.ends_with('/') {
            ("", &rest[open_end..])
        } else {
            match rest.find("</testcase>") {
                Some(e) => (&rest[open_end..e], &rest[e..]),
                None => (&rest[open_end..], ""),
            }
        };
        let skipped = body.find("<skipped").map(|s| {
            let tag_end = body[s..].find('>').map_or(body.len(), |e| s + e);
            attr(&body[s..tag_end], "message").unwrap_or_default()
        });
        let status = attr(open, "status").unwrap_or_default();
        cases.push(Case {
            name: attr(open, "name").unwrap_or_default(),
            skipped,
            failed: body.contains("<failure") || body.contains("<error") || status == "failed",
        });
        rest = next;
    }
    cases
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_of_a_ginkgo_junit_report() {
        let xml = r#"<testsuites><testsuite>
<testcase name="[sig-network] Netpol NetworkPolicy between server and client should support a &#39;default-deny-ingress&#39; policy [Feature:NetworkPolicy]" classname="Kubernetes e2e suite" status="passed" time="12.5"><system-err>x</system-err></testcase>
<testcase name="[sig-network] Netpol [Feature:SCTPConnectivity] should support SCTP" classname="Kubernetes e2e suite" status="skipped" time="0"><skipped message="skipped - filtered out"></skipped></testcase>
<testcase name="[sig-network] Netpol broken" classname="k" status="failed" time="1"><failure message="boom" type="failed">x</failure></testcase>
<testcase name="[sig-storage] other" classname="k" status="skipped" time="0"><skipped message="skipped"/></testcase>
</testsuite></testsuites>"#;
        let cases = junit_cases(xml);
        assert_eq!(cases.len(), 4);
        assert!(cases[0].name.contains("'default-deny-ingress'"));
        assert_eq!(cases[0].skipped, None);
        assert!(!cases[0].failed);
        assert_eq!(cases[1].skipped.as_deref(), Some("skipped - filtered out"));
        assert!(cases[2].failed);
        assert_eq!(cases[3].skipped.as_deref(), Some("skipped"));
        let netpol = regex::Regex::new("Netpol").unwrap();
        let sctp = regex::Regex::new("Feature:SCTPConnectivity").unwrap();
        let t = Tally::of(&cases, &netpol, &sctp);
        assert_eq!(t.ran, 2, "the passed and the failed spec ran");
        assert_eq!(t.by_skip.len(), 1);
        assert!(t.at_run_time.is_empty());
        // Skipped without --skip naming it: skipped at run time.
        let nothing = regex::Regex::new("no spec has this name").unwrap();
        let t = Tally::of(&cases, &netpol, &nothing);
        assert_eq!(t.at_run_time.len(), 1);
        assert!(t.at_run_time[0].name.contains("SCTPConnectivity"));
    }

    #[test]
    fn summary_lines_of_a_ginkgo_log() {
        let log = "noise\nRan 45 of 7144 Specs in 1000.1 seconds\nSUCCESS! -- 45 Passed | 0 Failed | 0 Pending | 7099 Skipped\nPASS\n";
        assert_eq!(summary_lines(log).len(), 2);
    }
}
