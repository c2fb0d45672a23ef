//! Real sockets inside network namespaces: small TCP and UDP responders and probes.
//!
//! A socket belongs to the namespace it was created in, whichever thread uses it later, so
//! sockets are created through [`NetNs::run`]. Responders stop (and close their socket, which
//! lets the namespace go away) when dropped.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Result;

use crate::netns::NetNs;

/// How long a probe waits for a handshake or a reply.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
const POLL: Duration = Duration::from_millis(10);

/// A responder thread; stopped and joined on drop.
pub struct Responder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts TCP connections on `addr` (inside `ns`) and answers each with "ok\n".
pub fn tcp_server(ns: &NetNs, addr: SocketAddr) -> Result<Responder> {
    let listener = ns.run(|| TcpListener::bind(addr))?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.write_all(b"ok\n");
                }
                Err(_) => std::thread::sleep(POLL),
            }
        }
    });
    Ok(Responder {
        stop,
        thread: Some(thread),
    })
}

/// Accepts TCP connections on `addr` (inside `ns`) and echoes what each one sends, for as long
/// as it stays open (one thread per connection).
pub fn tcp_echo_server(ns: &NetNs, addr: SocketAddr) -> Result<Responder> {
    let listener = ns.run(|| TcpListener::bind(addr))?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut sessions = Vec::new();
        while !flag.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let flag = flag.clone();
                    sessions.push(std::thread::spawn(move || {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(POLL));
                        let mut buf = [0u8; 256];
                        while !flag.load(Ordering::Relaxed) {
                            match stream.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if stream.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                                Err(_) => break,
                            }
                        }
                    }));
                }
                Err(_) => std::thread::sleep(POLL),
            }
        }
        for session in sessions {
            let _ = session.join();
        }
    });
    Ok(Responder {
        stop,
        thread: Some(thread),
    })
}

/// An open TCP connection made from inside a namespace.
pub struct Connection {
    stream: TcpStream,
}

impl Connection {
    /// Connects from `ns` to `addr`.
    pub fn open(ns: &NetNs, addr: SocketAddr) -> Result<Connection> {
        let stream = ns.run(|| TcpStream::connect_timeout(&addr, PROBE_TIMEOUT))?;
        stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
        Ok(Connection { stream })
    }

    /// Sends `msg` and whether the same bytes come back within [`PROBE_TIMEOUT`].
    pub fn round_trip(&mut self, msg: &[u8]) -> bool {
        if self.stream.write_all(msg).is_err() {
            return false;
        }
        let mut buf = vec![0u8; msg.len()];
        matches!(self.stream.read_exact(&mut buf), Ok(()) if buf == msg)
    }
}

/// Echoes UDP datagrams on `addr` (inside `ns`).
pub fn udp_echo(ns: &NetNs, addr: SocketAddr) -> Result<Responder> {
    let socket = ns.run(|| UdpSocket::bind(addr))?;
    socket.set_read_timeout(Some(POLL))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while !flag.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], peer);
            }
        }
    });
    Ok(Responder {
        stop,
        thread: Some(thread),
    })
}

/// Whether a TCP connection from `ns` to `addr` completes its handshake and receives the
/// server's greeting within [`PROBE_TIMEOUT`].
pub fn tcp_connects(ns: &NetNs, addr: SocketAddr) -> bool {
    ns.run(|| {
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(PROBE_TIMEOUT));
        let mut buf = [0u8; 3];
        matches!(stream.read_exact(&mut buf), Ok(()) if &buf == b"ok\n")
    })
}

/// Whether a UDP datagram from `ns` to `addr` is echoed back within [`PROBE_TIMEOUT`].
pub fn udp_replies(ns: &NetNs, addr: SocketAddr) -> bool {
    ns.run(|| {
        let Ok(socket) = UdpSocket::bind("0.0.0.0:0") else {
            return false;
        };
        let _ = socket.set_read_timeout(Some(PROBE_TIMEOUT));
        if socket.send_to(b"ping", addr).is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(socket.recv_from(&mut buf), Ok((4, from)) if from == addr && &buf[..4] == b"ping")
    })
}

/// Sends raw Ethernet frames (any ethertype, tags in the data) out of `ifname` inside `ns`
/// through an `AF_PACKET` socket, which passes them to the device as they are. A frame that tc
/// egress of `ifname` drops is not an error.
pub fn send_frames(ns: &NetNs, ifname: &str, frames: &[Vec<u8>]) -> Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    ns.run(|| -> Result<()> {
        let ifindex = crate::netns::ifindex(ifname)?;
        // SAFETY: a plain socket(2) call; protocol 0 sends without receiving anything.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            anyhow::bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        for frame in frames {
            anyhow::ensure!(frame.len() >= 14, "a frame of {} bytes", frame.len());
            // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            // skb->protocol: the frame's outer ethertype, in network order.
            addr.sll_protocol = u16::from_be_bytes([frame[12], frame[13]]).to_be();
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&frame[..6]);
            // SAFETY: `frame` and `addr` are live buffers of the lengths given.
            let sent = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if sent < 0 {
                let e = std::io::Error::last_os_error();
                // A frame dropped by tc egress of `ifname` itself is reported as ENOBUFS.
                if e.raw_os_error() != Some(libc::ENOBUFS) {
                    anyhow::bail!("sending on {ifname}: {e}");
                }
            }
        }
        Ok(())
    })
}
