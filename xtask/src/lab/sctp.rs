//! Just enough SCTP (RFC 9260) for probes on a kernel without SCTP sockets: the client sends INIT,
//! the server answers INIT-ACK (or ABORT for a port nobody serves), over raw IPv4 sockets of
//! protocol 132. conntrack and nftables NAT understand these packets, so Service DNAT works for
//! them like for real associations.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

pub const IPPROTO_SCTP: libc::c_int = 132;
pub const CHUNK_INIT: u8 = 1;
pub const CHUNK_INIT_ACK: u8 = 2;
pub const CHUNK_ABORT: u8 = 6;
const PARAM_STATE_COOKIE: u16 = 7;

/// CRC32c (Castagnoli, reflected polynomial 0x82F63B78), as SCTP's checksum.
pub fn crc32c(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    const TABLE: [u32; 256] = table();
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// A decoded packet: common header and the first chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src_port: u16,
    pub dst_port: u16,
    pub vtag: u32,
    pub chunk: u8,
    /// The Initiate Tag of an INIT or INIT-ACK chunk.
    pub initiate_tag: Option<u32>,
}

fn finish(mut pkt: Vec<u8>) -> Vec<u8> {
    let sum = crc32c(&pkt);
    // The checksum is stored in the byte order the CRC is computed in (little endian on the wire
    // representation of the reflected CRC), as Linux' sctp_compute_cksum does.
    pkt[8..12].copy_from_slice(&sum.to_le_bytes());
    pkt
}

fn header(src_port: u16, dst_port: u16, vtag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    p.extend_from_slice(&src_port.to_be_bytes());
    p.extend_from_slice(&dst_port.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p
}

fn init_chunk(p: &mut Vec<u8>, kind: u8, initiate_tag: u32, tsn: u32, params: &[u8]) {
    p.push(kind);
    p.push(0);
    p.extend_from_slice(&((20 + params.len()) as u16).to_be_bytes());
    p.extend_from_slice(&initiate_tag.to_be_bytes());
    p.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    p.extend_from_slice(&tsn.to_be_bytes());
    p.extend_from_slice(params);
}

/// INIT: verification tag 0, our Initiate Tag.
pub fn init(src_port: u16, dst_port: u16, initiate_tag: u32) -> Vec<u8> {
    let mut p = header(src_port, dst_port, 0);
    init_chunk(&mut p, CHUNK_INIT, initiate_tag, initiate_tag, &[]);
    finish(p)
}

/// INIT-ACK answering an INIT: verification tag = the peer's Initiate Tag, with a State Cookie.
pub fn init_ack(src_port: u16, dst_port: u16, peer_tag: u32, initiate_tag: u32) -> Vec<u8> {
    let mut p = header(src_port, dst_port, peer_tag);
    let cookie = initiate_tag.to_be_bytes();
    let mut param = Vec::new();
    param.extend_from_slice(&PARAM_STATE_COOKIE.to_be_bytes());
    param.extend_from_slice(&((4 + cookie.len()) as u16).to_be_bytes());
    param.extend_from_slice(&cookie);
    init_chunk(&mut p, CHUNK_INIT_ACK, initiate_tag, initiate_tag, &param);
    finish(p)
}

/// ABORT answering an INIT nobody serves (RFC 9260 §8.4: tag = the INIT's Initiate Tag, T bit 0).
pub fn abort(src_port: u16, dst_port: u16, peer_tag: u32) -> Vec<u8> {
    let mut p = header(src_port, dst_port, peer_tag);
    p.extend_from_slice(&[CHUNK_ABORT, 0, 0, 4]);
    finish(p)
}

/// Decodes an SCTP packet (no IP header); `None` if malformed or the checksum is wrong.
pub fn parse(b: &[u8]) -> Option<Packet> {
    if b.len() < 16 {
        return None;
    }
    let mut zeroed = b.to_vec();
    zeroed[8..12].fill(0);
    if crc32c(&zeroed).to_le_bytes() != b[8..12] {
        return None;
    }
    let be16 = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let be32 = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let chunk = b[12];
    let initiate_tag =
        (matches!(chunk, CHUNK_INIT | CHUNK_INIT_ACK) && b.len() >= 32).then(|| be32(16));
    Some(Packet {
        src_port: be16(0),
        dst_port: be16(2),
        vtag: be32(4),
        chunk,
        initiate_tag,
    })
}

/// Splits a datagram read from a raw IPv4 socket into source, destination and payload.
pub fn strip_ipv4(b: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, &[u8])> {
    if b.len() < 20 || b[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(b[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([b[2], b[3]])).min(b.len());
    if ihl < 20 || total < ihl {
        return None;
    }
    let src = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
    let dst = Ipv4Addr::new(b[16], b[17], b[18], b[19]);
    Some((src, dst, &b[ihl..total]))
}

/// A raw socket for protocol 132 of one address family in the calling thread's network
/// namespace. While it is open the kernel hands SCTP packets to it instead of answering "protocol
/// unreachable". IPv4 raw sockets read the IP header with each packet, IPv6 ones only the payload
/// (the source comes with `recvfrom`); [`RawSocket::recv_from`] hides the difference.
pub struct RawSocket {
    fd: OwnedFd,
    v6: bool,
}

impl RawSocket {
    pub fn open(v6: bool) -> io::Result<Self> {
        let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: plain syscall; the descriptor is owned below.
        let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, IPPROTO_SCTP) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            v6,
        })
    }

    /// The socket for `dst`'s family.
    pub fn for_peer(dst: IpAddr) -> io::Result<Self> {
        Self::open(dst.is_ipv6())
    }

    pub fn send_to(&self, pkt: &[u8], dst: IpAddr) -> io::Result<()> {
        let (addr, len) = sockaddr(dst);
        // SAFETY: valid buffer and sockaddr for the given lengths.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&addr as *const libc::sockaddr_storage).cast(),
                len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one packet: its source and the range of `buf` holding the SCTP packet; `Ok(None)`
    /// on timeout, `Ok(Some((src, empty)))` for a packet that is not one (an IPv4 header that
    /// does not parse).
    pub fn recv_from(
        &self,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> io::Result<Option<(IpAddr, std::ops::Range<usize>)>> {
        let tv = match timeout {
            Some(t) => libc::timeval {
                tv_sec: t.as_secs() as libc::time_t,
                tv_usec: t.subsec_micros().max(if t.is_zero() { 0 } else { 1 })
                    as libc::suseconds_t,
            },
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        // SAFETY: valid option value for SO_RCVTIMEO.
        unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        // SAFETY: an all-zero sockaddr_storage is valid.
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: valid buffer and address storage.
        let r = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_storage).cast(),
                &mut from_len,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Ok(None),
                io::ErrorKind::Interrupted => Ok(Some((Ipv4Addr::UNSPECIFIED.into(), 0..0))),
                _ => Err(e),
            };
        }
        let n = r as usize;
        if self.v6 {
            // SAFETY: an AF_INET6 socket fills a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((&from as *const libc::sockaddr_storage).cast()) };
            return Ok(Some((Ipv6Addr::from(sin6.sin6_addr.s6_addr).into(), 0..n)));
        }
        Ok(Some(match strip_ipv4(&buf[..n]) {
            Some((src, _, body)) => {
                // The payload follows the header: IHL words.
                let start = usize::from(buf[0] & 0x0f) * 4;
                (src.into(), start..start + body.len())
            }
            None => (Ipv4Addr::UNSPECIFIED.into(), 0..0),
        }))
    }
}

fn sockaddr(ip: IpAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match ip {
        IpAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(a).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large enough for any sockaddr.
            unsafe { std::ptr::write((&mut st as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        IpAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&mut st as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (st, len as libc::socklen_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vectors() {
        // RFC 3720 B.4 and the common check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn init_round_trip() {
        let p = parse(&init(40000, 80, 0xdead_beef)).unwrap();
        assert_eq!(
            p,
            Packet {
                src_port: 40000,
                dst_port: 80,
                vtag: 0,
                chunk: CHUNK_INIT,
                initiate_tag: Some(0xdead_beef)
            }
        );
        let a = parse(&init_ack(80, 40000, 0xdead_beef, 7)).unwrap();
        assert_eq!(a.vtag, 0xdead_beef);
        assert_eq!(a.chunk, CHUNK_INIT_ACK);
        assert_eq!(a.initiate_tag, Some(7));
        let ab = parse(&abort(80, 40000, 5)).unwrap();
        assert_eq!((ab.chunk, ab.vtag), (CHUNK_ABORT, 5));
    }

    #[test]
    fn corrupted_packets_are_rejected() {
        let mut p = init(1, 2, 3);
        p[20] ^= 1;
        assert!(parse(&p).is_none());
        assert!(parse(&p[..10]).is_none());
    }

    #[test]
    fn ipv4_header_is_stripped() {
        let payload = init(1, 2, 3);
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 132, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let total = (20 + payload.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&payload);
        let (s, d, body) = strip_ipv4(&ip).unwrap();
        assert_eq!(
            (s, d),
            (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2))
        );
        assert_eq!(body, &payload[..]);
    }
}
