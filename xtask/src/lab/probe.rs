//! Probes: one connection attempt from a source network namespace, judged the way the upstream
//! e2e's `agnhost connect` judges it — TCP: the handshake completes; UDP: a reply datagram comes
//! back; SCTP: an INIT-ACK comes back — within the timeout. Refused or silent = not connected.
//! Many probes run at once on a pool of threads, each entering the source namespace of its probe.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde::Serialize;

use super::{
    net::{enter_netns, open_netns, random_u32},
    sctp,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[clap(rename_all = "UPPER")]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    #[default]
    Pod,
    Service,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Pod => "pod",
            Via::Service => "service",
        }
    }
}

/// One planned probe.
#[derive(Clone, Debug)]
pub struct Job {
    /// `ns/pod`, `node/NAME` or `ext`.
    pub from: String,
    pub src_netns: String,
    /// `ns/pod` or `ext`.
    pub to: String,
    /// The address dialled: the pod IP, the ClusterIP or ext's address.
    pub to_ip: IpAddr,
    /// The port dialled (the Service port when via a Service).
    pub dial_port: u16,
    /// The destination's port (the pod's container port).
    pub port: u16,
    pub protocol: Protocol,
    pub via: Via,
    /// `ns/name` of the Service dialled.
    pub service: Option<String>,
}

/// A probe's result, in the `lab probe --json` format.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub from: String,
    pub to: String,
    pub to_ip: String,
    pub port: u16,
    pub protocol: Protocol,
    pub via: Via,
    pub connected: bool,
    pub ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_port: Option<u16>,
}

/// Runs every job, up to `parallel` at a time, keeping the input order.
pub fn run(jobs: &[Job], timeout: Duration, parallel: usize) -> Result<Vec<Outcome>> {
    let mut netns: BTreeMap<&str, File> = BTreeMap::new();
    for j in jobs {
        if !netns.contains_key(j.src_netns.as_str()) {
            netns.insert(&j.src_netns, open_netns(&j.src_netns)?);
        }
    }
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; jobs.len()]);
    let next = AtomicUsize::new(0);
    let workers = parallel.clamp(1, jobs.len().max(1));
    thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let ns = &netns[job.src_netns.as_str()];
                    let start = Instant::now();
                    let connected = enter_netns(ns).is_ok() && attempt(job, timeout);
                    let outcome = Outcome {
                        from: job.from.clone(),
                        to: job.to.clone(),
                        to_ip: job.to_ip.to_string(),
                        port: job.port,
                        protocol: job.protocol,
                        via: job.via,
                        connected,
                        ms: start.elapsed().as_millis() as u64,
                        service_port: job.service.as_ref().map(|_| job.dial_port),
                        service: job.service.clone(),
                    };
                    results.lock().expect("no poisoning")[i] = Some(outcome);
                }
            });
        }
    });
    Ok(results
        .into_inner()
        .expect("no poisoning")
        .into_iter()
        .map(|o| o.expect("every job ran"))
        .collect())
}

/// One attempt from the calling thread's network namespace.
pub fn attempt(job: &Job, timeout: Duration) -> bool {
    let dst = SocketAddr::new(job.to_ip, job.dial_port);
    match job.protocol {
        Protocol::Tcp => TcpStream::connect_timeout(&dst, timeout).is_ok(),
        Protocol::Udp => udp(dst, timeout).unwrap_or(false),
        Protocol::Sctp => sctp_init(dst, timeout).unwrap_or(false),
    }
}

fn udp(dst: SocketAddr, timeout: Duration) -> io::Result<bool> {
    let s = match dst {
        SocketAddr::V4(_) => UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?,
        SocketAddr::V6(_) => UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?,
    };
    s.connect(dst)?;
    s.send(b"hostname\n")?;
    s.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 512];
    Ok(s.recv(&mut buf)? > 0)
}

fn sctp_init(dst: SocketAddr, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    let sock = sctp::RawSocket::for_peer(dst.ip())?;
    let src_port = 32768 + (random_u32() % 28000) as u16;
    let tag = random_u32() | 1;
    sock.send_to(&sctp::init(src_port, dst.port(), tag), dst.ip())?;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let Some((src, body)) = sock.recv_from(&mut buf, Some(left))? else {
            return Ok(false);
        };
        let Some(p) = sctp::parse(&buf[body]) else {
            continue;
        };
        if src != dst.ip() || p.src_port != dst.port() || p.dst_port != src_port || p.vtag != tag {
            continue;
        }
        match p.chunk {
            sctp::CHUNK_INIT_ACK => return Ok(true),
            sctp::CHUNK_ABORT => return Ok(false),
            _ => continue,
        }
    }
}
