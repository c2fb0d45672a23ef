//! Packet parsing: Ethernet → IPv4 → TCP/UDP/SCTP ports.

use aya_ebpf::programs::TcContext;
use policy_common::{Reason, proto};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;

/// The fields a verdict needs.
pub struct Packet {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub protocol: u8,
    pub sport: u16,
    pub dport: u16,
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Result<*const T, Reason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(Reason::DroppedTruncated);
    }
    Ok((start + offset) as *const T)
}

/// `Ok(None)`: not a packet policy applies to (not IPv4, or an L4 protocol without ports).
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Option<Packet>, Reason> {
    // SAFETY: every pointer comes from ptr_at, which checked it against data_end.
    unsafe {
        let ethertype = u16::from_be(*ptr_at::<u16>(ctx, 12)?);
        if ethertype != ETH_P_IP {
            return Ok(None);
        }
        let vihl = *ptr_at::<u8>(ctx, ETH_HLEN)?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if ihl < 20 {
            return Err(Reason::DroppedMalformed);
        }
        let protocol = *ptr_at::<u8>(ctx, ETH_HLEN + 9)?;
        let src = *ptr_at::<[u8; 4]>(ctx, ETH_HLEN + 12)?;
        let dst = *ptr_at::<[u8; 4]>(ctx, ETH_HLEN + 16)?;
        match protocol {
            proto::TCP | proto::UDP | proto::SCTP => {}
            _ => return Ok(None),
        }
        let l4 = ETH_HLEN + ihl;
        let ports = *ptr_at::<[u8; 4]>(ctx, l4)?;
        Ok(Some(Packet {
            src,
            dst,
            protocol,
            sport: u16::from_be_bytes([ports[0], ports[1]]),
            dport: u16::from_be_bytes([ports[2], ports[3]]),
        }))
    }
}
