//! Packet parsing: Ethernet → IPv4 (with options) / IPv6 (with extension headers) → TCP, UDP and
//! SCTP ports.
//!
//! Reads use direct packet access (a helper call per header costs more than the rest of the
//! parse). Headers outside the linear part of a non-linear skb are pulled in first
//! (`bpf_skb_pull_data`); a read past the end of the packet is [`Reason::DroppedTruncated`].
//!
//! What is policed, and why the rest is not:
//! - TCP, UDP and SCTP over IPv4 and IPv6: the only protocols NetworkPolicy rules can name.
//! - ICMP, ICMPv6, ARP and every other IP protocol pass as [`Reason::AllowedNotPoliced`]: the
//!   API leaves their treatment undefined, and dropping them breaks path-MTU discovery (ICMP
//!   "fragmentation needed" / ICMPv6 "packet too big"), IPv6 neighbour discovery and IPv4
//!   address resolution. ESP is not policed either (its payload is opaque).
//! - Every other ethertype ([`Parsed::NotIp`]: 802.1Q / 802.1ad VLAN tags, MPLS, PPPoE, …) is
//!   judged by isolation alone: dropped as [`Reason::DroppedNotIp`] in a direction the endpoint
//!   is isolated in, [`Reason::AllowedNotPoliced`] otherwise. Nothing behind such a header is
//!   parsed, so an isolated pod cannot carry TCP or UDP past its policy inside a tag or a label
//!   stack; no NetworkPolicy rule can allow them, as none can name them.
//! - An IPv6 packet whose source or destination is IPv4-mapped (`::ffff:0:0/96`,
//!   [`Parsed::V4Mapped`]), whatever its protocol, is judged by isolation alone too, with
//!   [`Reason::DroppedV4Mapped`] as its drop. The programs store IPv4 addresses in that form, so
//!   looked up it would be an IPv4 packet: the IPv4 pod's identity, IPv4 ipBlocks, IPv4 flows in
//!   conntrack. It is IPv6, which no IPv4 rule matches, and no IPv6 rule can name it (no IPv6
//!   host has such an address: RFC 4291 2.5.5.2, and Linux drops received IPv6 packets from
//!   one). Nothing after the fixed header is parsed. The check belongs to the IPv6 parse: IPv4
//!   packets never run it.
//! - IPv6 extension headers are walked up to [`MAX_EXT_HEADERS`] deep (hop-by-hop, routing,
//!   destination options, fragment, and AH so that TCP cannot hide behind it); a longer chain is
//!   [`Reason::DroppedMalformed`] rather than a chance to smuggle ports past the policy.
//! - Fragments: the first fragment carries the ports and is judged like any packet; later
//!   fragments have no ports and follow the first one's verdict (`fragments.rs`). An IPv4 TCP
//!   fragment at offset 8 bytes (RFC 1858 overlap attack) is malformed.
//! - Length fields that disagree with the headers (IHL < 5, IPv4 total length shorter than its
//!   header, wrong version) are malformed. A total/payload length of 0 is accepted: that is how
//!   BIG TCP super-packets look on the stack.

use aya_ebpf::programs::TcContext;
use policy_common::{Addr, Reason, V4_MAPPED_WORD, addr_is_v4_mapped, proto};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;

/// IPv6 extension headers walked before giving up (malformed).
pub const MAX_EXT_HEADERS: usize = 6;

const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// `Packet::frag` values.
pub const FRAG_NONE: u8 = 0;
/// First fragment (offset 0, more fragments follow): has ports, its verdict is recorded.
pub const FRAG_FIRST: u8 = 1;
/// Later fragment: no ports, follows the first fragment's verdict.
pub const FRAG_LATER: u8 = 2;

/// The fields a verdict needs. Addresses are IPv6 or IPv4-mapped IPv6 (`::ffff:a.b.c.d`), as
/// words ([`Addr`]) so that keys are built with word copies.
#[derive(Clone, Copy)]
pub struct Packet {
    pub src: Addr,
    pub dst: Addr,
    /// Host byte order; 0 for later fragments.
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// 4 or 6; 0 until parsed.
    pub family: u8,
    pub tcp_flags: u8,
    /// `FRAG_*`.
    pub frag: u8,
    /// IPv4 identification or IPv6 fragment identification.
    pub frag_id: u32,
}

impl Packet {
    /// All fields zero. The zero is opaque to the optimiser on purpose, and the byte fields
    /// take different bytes of it: four or more stores of one value become a `memset`, which the
    /// BPF backend (run with `--bpf-expand-memcpy-in-order` by bpf-linker) never expands inline,
    /// and the call it makes instead is a byte loop that costs more than the whole parse.
    #[inline(always)]
    pub fn empty() -> Self {
        let z = core::hint::black_box(0u32);
        Packet {
            src: [z, z, z, z],
            dst: [z, z, z, z],
            sport: z as u16,
            dport: z as u16,
            protocol: z as u8,
            family: (z >> 8) as u8,
            tcp_flags: (z >> 16) as u8,
            frag: FRAG_NONE | (z >> 24) as u8,
            frag_id: z,
        }
    }
}

/// What the parser found.
pub enum Parsed {
    /// ARP, or IP but not TCP/UDP/SCTP: passes unpoliced (see the module documentation).
    NotPoliced,
    /// Neither IPv4, IPv6 nor ARP: dropped where the endpoint is isolated in the direction
    /// judged ([`Reason::DroppedNotIp`]), unpoliced elsewhere. `Packet` is left empty.
    NotIp,
    /// IPv6 with an IPv4-mapped source or destination: dropped where the endpoint is isolated
    /// in the direction judged ([`Reason::DroppedV4Mapped`]), unpoliced elsewhere. `Packet`
    /// holds the family and the addresses only.
    V4Mapped,
    /// `Packet` is filled in.
    Policed,
}

/// Headers starting further into the packet than this are malformed (it bounds the offsets
/// the verifier must reason about; real header chains are far shorter).
const MAX_HEADER_OFFSET: usize = 4096;

/// `skb->data` / `skb->data_end`, reloaded at every use: the verifier turns these 32-bit
/// context loads into packet pointers, and a value LLVM kept in a register would come back
/// zero-extended by shifts, which the verifier rejects on pointers.
#[inline(always)]
fn data(ctx: &TcContext) -> usize {
    // SAFETY: a field of the __sk_buff the kernel handed us.
    unsafe { core::ptr::read_volatile(&(*ctx.skb.skb).data) as usize }
}

#[inline(always)]
fn data_end(ctx: &TcContext) -> usize {
    // SAFETY: as in `data`.
    unsafe { core::ptr::read_volatile(&(*ctx.skb.skb).data_end) as usize }
}

/// Reads a `T` at `offset` with direct packet access. Bytes beyond the linear part of a
/// non-linear skb are pulled in first; bytes beyond the packet are [`Reason::DroppedTruncated`].
#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, Reason> {
    let size = core::mem::size_of::<T>();
    if offset > MAX_HEADER_OFFSET {
        return Err(Reason::DroppedMalformed);
    }
    if data(ctx) + offset + size > data_end(ctx) {
        if offset + size > ctx.len() as usize {
            return Err(Reason::DroppedTruncated);
        }
        if ctx.pull_data((offset + size) as u32).is_err() {
            return Err(Reason::DroppedInternal);
        }
    }
    // Fresh pointers (a pull moves the data), checked again for the verifier, which only
    // trusts a bound on this very pointer plus a constant.
    let ptr = data(ctx) + offset;
    if ptr + size > data_end(ctx) {
        return Err(Reason::DroppedTruncated);
    }
    // SAFETY: `ptr .. ptr + size` was checked against data_end just above.
    Ok(unsafe { core::ptr::read_unaligned(ptr as *const T) })
}

#[inline(always)]
const fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

#[inline(always)]
const fn is_policed(protocol: u8) -> bool {
    matches!(protocol, proto::TCP | proto::UDP | proto::SCTP)
}

/// Whether the skb carries a VLAN tag outside its data (`skb->vlan_tci`, "accelerated"). The
/// kernel moves the outer 802.1Q / 802.1ad tag of a received frame there before tc ingress, and
/// a VLAN device leaves it there for a lower device that inserts tags itself (veth does) until
/// after tc egress. The data then starts with the inner ethertype: without this check a tagged
/// frame would be judged by the IP packet inside it. Only pod veths ask (`decide.rs`): on an
/// uplink the tag belongs to the node's own network and the IP packet inside is what counts.
#[inline(always)]
pub fn vlan_tagged(ctx: &TcContext) -> bool {
    // SAFETY: a field of the __sk_buff the kernel handed us.
    unsafe { core::ptr::read_volatile(&(*ctx.skb.skb).vlan_present) != 0 }
}

#[inline(always)]
pub fn parse(ctx: &TcContext, pkt: &mut Packet) -> Result<Parsed, Reason> {
    let ethertype = be16(load(ctx, 12)?);
    match ethertype {
        ETH_P_IP => parse_v4(ctx, pkt),
        ETH_P_IPV6 => parse_v6(ctx, pkt),
        ETH_P_ARP => Ok(Parsed::NotPoliced),
        _ => Ok(Parsed::NotIp),
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, pkt: &mut Packet) -> Result<Parsed, Reason> {
    let h: [u8; 20] = load(ctx, ETH_HLEN)?;
    if h[0] >> 4 != 4 {
        return Err(Reason::DroppedMalformed);
    }
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    let total_len = be16([h[2], h[3]]) as usize;
    if ihl < 20 || (total_len != 0 && total_len < ihl) {
        return Err(Reason::DroppedMalformed);
    }
    let protocol = h[9];
    pkt.family = 4;
    pkt.protocol = protocol;
    pkt.src = mapped(word(&h, 12));
    pkt.dst = mapped(word(&h, 16));
    if !is_policed(protocol) {
        return Ok(Parsed::NotPoliced);
    }
    let frag = be16([h[6], h[7]]);
    let offset = frag & 0x1fff;
    let more = frag & 0x2000 != 0;
    if offset != 0 || more {
        pkt.frag_id = be16([h[4], h[5]]) as u32;
        if offset != 0 {
            if offset == 1 && protocol == proto::TCP {
                return Err(Reason::DroppedMalformed);
            }
            pkt.frag = FRAG_LATER;
            return Ok(Parsed::Policed);
        }
        pkt.frag = FRAG_FIRST;
    }
    parse_l4(ctx, pkt, ETH_HLEN + ihl)
}

#[inline(always)]
fn parse_v6(ctx: &TcContext, pkt: &mut Packet) -> Result<Parsed, Reason> {
    let h: [u8; 40] = load(ctx, ETH_HLEN)?;
    if h[0] >> 4 != 6 {
        return Err(Reason::DroppedMalformed);
    }
    pkt.family = 6;
    pkt.src = [word(&h, 8), word(&h, 12), word(&h, 16), word(&h, 20)];
    pkt.dst = [word(&h, 24), word(&h, 28), word(&h, 32), word(&h, 36)];
    if is_mapped_v4(&pkt.src) || is_mapped_v4(&pkt.dst) {
        return Ok(Parsed::V4Mapped);
    }

    let mut next = h[6];
    let mut offset = ETH_HLEN + 40;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let e: [u8; 2] = load(ctx, offset)?;
                next = e[0];
                offset += (e[1] as usize + 1) * 8;
            }
            IPV6_AH => {
                let e: [u8; 2] = load(ctx, offset)?;
                next = e[0];
                offset += (e[1] as usize + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let f: [u8; 8] = load(ctx, offset)?;
                next = f[0];
                offset += 8;
                let field = be16([f[2], f[3]]);
                let frag_offset = field >> 3;
                let more = field & 1 != 0;
                if frag_offset != 0 || more {
                    pkt.frag_id = u32::from_be_bytes([f[4], f[5], f[6], f[7]]);
                    if frag_offset != 0 {
                        // Later fragment: the upper-layer protocol is in every fragment header.
                        pkt.protocol = next;
                        if !is_policed(next) {
                            return Ok(Parsed::NotPoliced);
                        }
                        pkt.frag = FRAG_LATER;
                        return Ok(Parsed::Policed);
                    }
                    pkt.frag = FRAG_FIRST;
                }
                // An atomic fragment (offset 0, no more) is a whole datagram.
            }
            _ => break,
        }
    }
    if matches!(
        next,
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH | IPV6_FRAGMENT
    ) {
        return Err(Reason::DroppedMalformed);
    }
    pkt.protocol = next;
    if !is_policed(next) {
        return Ok(Parsed::NotPoliced);
    }
    parse_l4(ctx, pkt, offset)
}

/// Ports (and TCP flags). The whole fixed header must be present: 14 bytes of TCP up to the
/// flags, 8 of UDP, 12 of SCTP; a first fragment too short for it is truncated.
#[inline(always)]
fn parse_l4(ctx: &TcContext, pkt: &mut Packet, offset: usize) -> Result<Parsed, Reason> {
    let ports: [u8; 4] = match pkt.protocol {
        proto::TCP => {
            let t: [u8; 14] = load(ctx, offset)?;
            pkt.tcp_flags = t[13];
            [t[0], t[1], t[2], t[3]]
        }
        proto::UDP => {
            let u: [u8; 8] = load(ctx, offset)?;
            [u[0], u[1], u[2], u[3]]
        }
        _ => {
            let s: [u8; 12] = load(ctx, offset)?;
            [s[0], s[1], s[2], s[3]]
        }
    };
    pkt.sport = be16([ports[0], ports[1]]);
    pkt.dport = be16([ports[2], ports[3]]);
    Ok(Parsed::Policed)
}

/// Four header bytes as an [`Addr`] word (network byte order kept).
#[inline(always)]
const fn word<const N: usize>(h: &[u8; N], at: usize) -> u32 {
    u32::from_ne_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
}

/// `::ffff:a.b.c.d` from the IPv4 address word.
#[inline(always)]
pub const fn mapped(v4: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD, v4]
}

/// Whether an address is IPv4-mapped (how IPv4 addresses are stored in 16-byte fields; in an
/// IPv6 header, [`Reason::DroppedV4Mapped`]).
#[inline(always)]
pub const fn is_mapped_v4(addr: &Addr) -> bool {
    addr_is_v4_mapped(addr)
}
