//! A small blocking rtnetlink client: dumps of links, addresses and routes, network-namespace ids,
//! and change notifications — in the network namespace the socket was opened in.
//!
//! Blocking on purpose: sockets for other namespaces are opened on a short-lived thread that
//! `setns`es (never on an async runtime thread), and dumps are fast.

use std::{
    fs::File,
    io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    nsid::{NsidAttribute, NsidMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// One network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `veth`, `bridge`, `vxlan`, … (IFLA_INFO_KIND), when the kernel reports one.
    pub kind: Option<String>,
    /// For a veth: the peer's ifindex, in the namespace named by `link_netnsid` (or this one).
    pub peer_index: Option<u32>,
    /// The namespace id (as seen from this namespace) of the peer's namespace.
    pub link_netnsid: Option<i32>,
    /// The bridge (or other controller) this interface is enslaved to.
    pub controller: Option<u32>,
}

/// One interface address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// One route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Destination prefix; `None` for a default route.
    pub destination: Option<(IpAddr, u8)>,
    /// Output interfaces (several for a multipath route).
    pub oifs: Vec<u32>,
    /// The route goes through a gateway (a next hop on another machine).
    pub via_gateway: bool,
}

const RT_TABLE_MAIN: u32 = 254;

/// A route socket bound in one network namespace.
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    /// A socket in the calling thread's network namespace.
    pub fn new() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { socket, seq: 0 })
    }

    /// A socket in the network namespace `ns` (an nsfs file: `/proc/PID/ns/net`,
    /// `/run/netns/NAME`). The caller's namespace is not changed.
    pub fn in_namespace(ns: &File) -> io::Result<Self> {
        let fd = ns.as_fd().try_clone_to_owned()?;
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on this short-lived thread only; it exits right after.
                if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Self::new()
            })
            .join()
            .map_err(|_| io::Error::other("netns thread panicked"))?
        })
    }

    /// A socket subscribed to link, address and route changes (IPv4 and IPv6) of this namespace.
    pub fn subscribe() -> io::Result<Socket> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        for group in [
            libc::RTNLGRP_LINK,
            libc::RTNLGRP_IPV4_IFADDR,
            libc::RTNLGRP_IPV6_IFADDR,
            libc::RTNLGRP_IPV4_ROUTE,
            libc::RTNLGRP_IPV6_ROUTE,
        ] {
            socket.add_membership(group)?;
        }
        Ok(socket)
    }

    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;

        let mut out = Vec::new();
        let mut rx = Vec::with_capacity(1 << 16);
        loop {
            rx.clear();
            self.socket.recv(&mut rx, 0)?;
            let mut offset = 0;
            while offset < rx.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += (len + 3) & !3;
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out), // ACK
                            Some(_) => Err(e.to_io()),
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        out.push(m);
                        if flags & NLM_F_DUMP == 0 && flags & NLM_F_ACK == 0 {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let msgs = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(parse_link(l)),
                _ => None,
            })
            .collect())
    }

    pub fn addresses(&mut self) -> io::Result<Vec<Address>> {
        let msgs = self.request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => parse_address(a),
                _ => None,
            })
            .collect())
    }

    /// Unicast routes of the main table, both families.
    pub fn routes(&mut self) -> io::Result<Vec<Route>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            let msgs = self.request(RouteNetlinkMessage::GetRoute(msg), NLM_F_DUMP)?;
            out.extend(msgs.into_iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => parse_route(r),
                _ => None,
            }));
        }
        Ok(out)
    }

    /// The id this namespace gives to the namespace `ns` (None when it has none).
    pub fn nsid_of(&mut self, ns: &File) -> io::Result<Option<i32>> {
        let mut msg = NsidMessage::default();
        msg.attributes
            .push(NsidAttribute::Fd(ns.as_raw_fd() as u32));
        let msgs = self.request(RouteNetlinkMessage::GetNsId(msg), 0)?;
        Ok(msgs.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewNsId(n) => n.attributes.into_iter().find_map(|a| match a {
                NsidAttribute::Id(id) if id >= 0 => Some(id),
                _ => None,
            }),
            _ => None,
        }))
    }
}

fn parse_link(l: LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        kind: None,
        peer_index: None,
        link_netnsid: None,
        controller: None,
    };
    for attr in l.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Link(i) => link.peer_index = Some(i),
            LinkAttribute::LinkNetNsId(id) => link.link_netnsid = Some(id),
            LinkAttribute::Controller(i) => link.controller = Some(i),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        link.kind = Some(kind_name(&kind));
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Veth => "veth".into(),
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Vxlan => "vxlan".into(),
        other => format!("{other}").to_lowercase(),
    }
}

fn parse_address(a: AddressMessage) -> Option<Address> {
    // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS otherwise.
    let mut address = None;
    let mut local = None;
    for attr in a.attributes {
        match attr {
            AddressAttribute::Address(ip) => address = Some(ip),
            AddressAttribute::Local(ip) => local = Some(ip),
            _ => {}
        }
    }
    Some(Address {
        index: a.header.index,
        addr: local.or(address)?,
        prefix_len: a.header.prefix_len,
    })
}

fn parse_route(r: RouteMessage) -> Option<Route> {
    let mut table = u32::from(r.header.table);
    let mut destination = None;
    let mut oifs = Vec::new();
    let mut via_gateway = false;
    for attr in &r.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                destination = Some((IpAddr::V4(*a), r.header.destination_prefix_length))
            }
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                destination = Some((IpAddr::V6(*a), r.header.destination_prefix_length))
            }
            RouteAttribute::Oif(i) => oifs.push(*i),
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => via_gateway = true,
            RouteAttribute::MultiPath(hops) => {
                via_gateway = true;
                oifs.extend(hops.iter().map(|h| h.interface_index))
            }
            _ => {}
        }
    }
    if table != RT_TABLE_MAIN || r.header.kind != netlink_packet_route::route::RouteType::Unicast {
        return None;
    }
    Some(Route {
        destination,
        oifs,
        via_gateway,
    })
}
