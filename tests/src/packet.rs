//! Hand-built packets (Ethernet + IPv4/IPv6 + TCP/UDP/SCTP) for `BPF_PROG_TEST_RUN`, and
//! frames of other ethertypes: ARP, and built packets wrapped in a VLAN tag, an MPLS label or a
//! PPPoE session header.

use std::net::IpAddr;

use policy_common::proto;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// IPv6 extension header types the builder can insert.
pub const EXT_HOPOPTS: u8 = 0;
pub const EXT_ROUTING: u8 = 43;
pub const EXT_DSTOPTS: u8 = 60;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    /// Offset in 8-byte units.
    pub offset: u16,
    pub more: bool,
    pub id: u32,
}

/// A packet to build.
#[derive(Clone, Debug)]
pub struct PacketSpec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    /// IPv4 option bytes (NOPs), a multiple of 4, at most 40.
    pub ipv4_options: usize,
    /// IPv6 extension headers (8 bytes each) before the upper layer.
    pub ipv6_ext: Vec<u8>,
    pub fragment: Option<Fragment>,
    pub payload: usize,
}

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("address {s}: {e}"))
}

impl PacketSpec {
    pub fn new(protocol: u8, src: &str, sport: u16, dst: &str, dport: u16) -> PacketSpec {
        PacketSpec {
            src: addr(src),
            dst: addr(dst),
            protocol,
            sport,
            dport,
            tcp_flags: if protocol == proto::TCP { TCP_SYN } else { 0 },
            ipv4_options: 0,
            ipv6_ext: Vec::new(),
            fragment: None,
            payload: 16,
        }
    }

    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> PacketSpec {
        Self::new(proto::TCP, src, sport, dst, dport)
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> PacketSpec {
        Self::new(proto::UDP, src, sport, dst, dport)
    }

    pub fn sctp(src: &str, sport: u16, dst: &str, dport: u16) -> PacketSpec {
        Self::new(proto::SCTP, src, sport, dst, dport)
    }

    /// The same flow in the other direction (a TCP reply carries SYN|ACK).
    pub fn reply(&self) -> PacketSpec {
        PacketSpec {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            tcp_flags: if self.protocol == proto::TCP {
                TCP_SYN | TCP_ACK
            } else {
                0
            },
            fragment: None,
            ..self.clone()
        }
    }

    pub fn flags(mut self, flags: u8) -> PacketSpec {
        self.tcp_flags = flags;
        self
    }

    pub fn fragment(mut self, offset: u16, more: bool, id: u32) -> PacketSpec {
        self.fragment = Some(Fragment { offset, more, id });
        self
    }

    pub fn ipv4_options(mut self, bytes: usize) -> PacketSpec {
        assert!(bytes.is_multiple_of(4) && bytes <= 40);
        self.ipv4_options = bytes;
        self
    }

    pub fn ipv6_ext(mut self, headers: &[u8]) -> PacketSpec {
        self.ipv6_ext = headers.to_vec();
        self
    }

    fn l4_header(&self) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&self.sport.to_be_bytes());
        h.extend_from_slice(&self.dport.to_be_bytes());
        match self.protocol {
            proto::TCP => {
                h.extend_from_slice(&1u32.to_be_bytes()); // seq
                h.extend_from_slice(&0u32.to_be_bytes()); // ack
                h.push(5 << 4);
                h.push(self.tcp_flags);
                h.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, csum, urg
            }
            proto::UDP => {
                let len = 8 + self.payload as u16;
                h.extend_from_slice(&len.to_be_bytes());
                h.extend_from_slice(&[0, 0]);
            }
            proto::SCTP => {
                h.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]); // vtag, checksum
                h.extend_from_slice(&[1, 0, 0, 4]); // INIT chunk header
            }
            _ => {}
        }
        h
    }

    /// The upper-layer bytes: the L4 header (except in later fragments) and the payload.
    fn upper(&self) -> Vec<u8> {
        let later = self.fragment.is_some_and(|f| f.offset != 0);
        let mut u = if later { Vec::new() } else { self.l4_header() };
        u.extend(std::iter::repeat_n(0xab, self.payload));
        u
    }

    pub fn build(&self) -> Vec<u8> {
        let mut p = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                p.extend_from_slice(&0x0800u16.to_be_bytes());
                let upper = self.upper();
                let ihl = 20 + self.ipv4_options;
                let total = (ihl + upper.len()) as u16;
                let (id, frag) = match self.fragment {
                    Some(f) => (f.id as u16, f.offset | if f.more { 0x2000 } else { 0 }),
                    None => (0x1234, 0x4000),
                };
                let mut ip = vec![0x40 | (ihl / 4) as u8, 0];
                ip.extend_from_slice(&total.to_be_bytes());
                ip.extend_from_slice(&id.to_be_bytes());
                ip.extend_from_slice(&frag.to_be_bytes());
                ip.extend_from_slice(&[64, self.protocol, 0, 0]);
                ip.extend_from_slice(&src.octets());
                ip.extend_from_slice(&dst.octets());
                ip.extend(std::iter::repeat_n(1u8, self.ipv4_options)); // NOP options
                let csum = checksum(&ip);
                ip[10..12].copy_from_slice(&csum.to_be_bytes());
                p.extend_from_slice(&ip);
                p.extend_from_slice(&upper);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                p.extend_from_slice(&0x86ddu16.to_be_bytes());
                // Header chain: extension headers, then the fragment header, then upper layer.
                let mut chain: Vec<u8> = self.ipv6_ext.clone();
                if self.fragment.is_some() {
                    chain.push(44);
                }
                let mut ext = Vec::new();
                for (i, &kind) in chain.iter().enumerate() {
                    let next = chain.get(i + 1).copied().unwrap_or(self.protocol);
                    if kind == 44 {
                        let f = self.fragment.expect("fragment header");
                        ext.extend_from_slice(&[next, 0]);
                        let field = (f.offset << 3) | u16::from(f.more);
                        ext.extend_from_slice(&field.to_be_bytes());
                        ext.extend_from_slice(&f.id.to_be_bytes());
                    } else {
                        ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]); // PadN
                    }
                }
                let upper = self.upper();
                let first = chain.first().copied().unwrap_or(self.protocol);
                let payload_len = (ext.len() + upper.len()) as u16;
                p.extend_from_slice(&[0x60, 0, 0, 0]);
                p.extend_from_slice(&payload_len.to_be_bytes());
                p.extend_from_slice(&[first, 64]);
                p.extend_from_slice(&src.octets());
                p.extend_from_slice(&dst.octets());
                p.extend_from_slice(&ext);
                p.extend_from_slice(&upper);
            }
            _ => panic!("mixed address families"),
        }
        p
    }

    /// Offset of the upper-layer header in the built packet.
    pub fn l4_offset(&self) -> usize {
        match self.src {
            IpAddr::V4(_) => 14 + 20 + self.ipv4_options,
            IpAddr::V6(_) => {
                14 + 40 + 8 * (self.ipv6_ext.len() + usize::from(self.fragment.is_some()))
            }
        }
    }
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethertypes of the wrapped frames.
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const ETH_P_MPLS_UC: u16 = 0x8847;
pub const ETH_P_MPLS_MC: u16 = 0x8848;
pub const ETH_P_PPP_SES: u16 = 0x8864;

/// `frame` (an Ethernet frame) with a VLAN tag (`tpid` 0x8100 or 0x88a8, VLAN id `vid`)
/// inserted after the MAC addresses; the original ethertype follows the tag.
pub fn vlan_tagged(frame: &[u8], tpid: u16, vid: u16) -> Vec<u8> {
    let mut p = frame[..12].to_vec();
    p.extend_from_slice(&tpid.to_be_bytes());
    p.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    p.extend_from_slice(&frame[12..]);
    p
}

/// `frame`'s payload behind one MPLS label stack entry (`label`, bottom of stack, TTL 64),
/// with `ethertype` 0x8847 (unicast) or 0x8848 (multicast).
pub fn mpls(frame: &[u8], ethertype: u16, label: u32) -> Vec<u8> {
    let mut p = frame[..12].to_vec();
    p.extend_from_slice(&ethertype.to_be_bytes());
    let entry = ((label & 0xf_ffff) << 12) | (1 << 8) | 64;
    p.extend_from_slice(&entry.to_be_bytes());
    p.extend_from_slice(&frame[14..]);
    p
}

/// `frame`'s IP packet in a PPPoE session (0x8864; PPP protocol 0x0021 for IPv4, 0x0057 for
/// IPv6).
pub fn pppoe_session(frame: &[u8], session: u16) -> Vec<u8> {
    let ip = &frame[14..];
    let ppp: u16 = if frame[12..14] == [0x86, 0xdd] {
        0x0057
    } else {
        0x0021
    };
    let mut p = frame[..12].to_vec();
    p.extend_from_slice(&ETH_P_PPP_SES.to_be_bytes());
    p.extend_from_slice(&[0x11, 0x00]);
    p.extend_from_slice(&session.to_be_bytes());
    p.extend_from_slice(&((ip.len() + 2) as u16).to_be_bytes());
    p.extend_from_slice(&ppp.to_be_bytes());
    p.extend_from_slice(ip);
    p
}

/// A broadcast ARP request (Ethernet, IPv4) for `target` from `sender`.
pub fn arp_request(sender: std::net::Ipv4Addr, target: std::net::Ipv4Addr) -> Vec<u8> {
    let mac = [0x02, 0, 0, 0, 0, 1];
    let mut p = vec![0xff; 6];
    p.extend_from_slice(&mac);
    p.extend_from_slice(&0x0806u16.to_be_bytes());
    // htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4, op 1 (request)
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&mac);
    p.extend_from_slice(&sender.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&target.octets());
    p
}
