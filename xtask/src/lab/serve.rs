//! The responder: one process per pod (and one for `ext`), started inside the pod's network
//! namespace, serving every declared container port: TCP accepts (and writes the pod's name), UDP
//! echoes, SCTP answers INIT with INIT-ACK over a raw socket (ABORT for ports nobody serves).

use std::{
    collections::BTreeSet,
    io::Write,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    thread,
};

use anyhow::{Context, Result};

use super::{net::random_u32, sctp};

#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Name written to TCP clients (the pod's `ns/name`).
    #[arg(long)]
    pub name: String,
    #[arg(long, value_delimiter = ',')]
    pub tcp: Vec<u16>,
    #[arg(long, value_delimiter = ',')]
    pub udp: Vec<u16>,
    #[arg(long, value_delimiter = ',')]
    pub sctp: Vec<u16>,
}

impl ServeArgs {
    /// Command-line arguments for `lab serve`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec!["--name".to_string(), self.name.clone()];
        for (flag, ports) in [
            ("--tcp", &self.tcp),
            ("--udp", &self.udp),
            ("--sctp", &self.sctp),
        ] {
            if !ports.is_empty() {
                a.push(flag.to_string());
                a.push(
                    ports
                        .iter()
                        .map(u16::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                );
            }
        }
        a
    }
}

/// Binds everything, prints `ready` on stdout, then serves until killed.
pub fn serve(args: ServeArgs) -> Result<()> {
    let mut workers = Vec::new();
    for &port in &args.tcp {
        let l = bind_both(port, TcpListener::bind)
            .with_context(|| format!("binding TCP port {port}"))?;
        let name = args.name.clone();
        workers.push(thread::spawn(move || {
            for mut conn in l.incoming().flatten() {
                let _ = writeln!(conn, "{name}");
            }
        }));
    }
    for &port in &args.udp {
        let s =
            bind_both(port, UdpSocket::bind).with_context(|| format!("binding UDP port {port}"))?;
        workers.push(thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                if let Ok((n, peer)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], peer);
                }
            }
        }));
    }
    if !args.sctp.is_empty() {
        let ports: BTreeSet<u16> = args.sctp.iter().copied().collect();
        for v6 in [false, true] {
            let sock = sctp::RawSocket::open(v6).context("opening a raw SCTP socket")?;
            let ports = ports.clone();
            workers.push(thread::spawn(move || serve_sctp(&sock, &ports)));
        }
    }
    let mut out = std::io::stdout();
    writeln!(out, "ready")?;
    out.flush()?;
    // Nobody reads stdout any more: point it at /dev/null so a late write never gets SIGPIPE.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: duplicates a valid descriptor onto stdout.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

/// Binds the port on `[::]`, which takes both families (IPv4 arrives IPv4-mapped, the default
/// `bindv6only=0` of a fresh namespace), or on `0.0.0.0` where IPv6 is off.
fn bind_both<T>(port: u16, bind: impl Fn(SocketAddr) -> std::io::Result<T>) -> std::io::Result<T> {
    bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        .or_else(|_| bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))))
}

fn serve_sctp(sock: &sctp::RawSocket, ports: &BTreeSet<u16>) {
    let mut buf = [0u8; 2048];
    loop {
        let Ok(Some((src, body))) = sock.recv_from(&mut buf, None) else {
            continue;
        };
        let Some(p) = sctp::parse(&buf[body]) else {
            continue;
        };
        let (sctp::CHUNK_INIT, 0, Some(peer_tag)) = (p.chunk, p.vtag, p.initiate_tag) else {
            continue;
        };
        let reply = if ports.contains(&p.dst_port) {
            sctp::init_ack(p.dst_port, p.src_port, peer_tag, random_u32() | 1)
        } else {
            sctp::abort(p.dst_port, p.src_port, peer_tag)
        };
        let _ = sock.send_to(&reply, src);
    }
}
