//! What identity numbers stand for.

use std::net::IpAddr;
use std::sync::Arc;

use super::cidr::IpBlock;
use crate::model::{Labels, NAMESPACE_NAME_LABEL, NamedPort, Protocol};

/// What a pod identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodIdentityKey {
    /// Including `kubernetes.io/metadata.name`.
    pub namespace_labels: Arc<Labels>,
    pub labels: Labels,
    /// Sorted.
    pub named_ports: Vec<NamedPort>,
}

impl PodIdentityKey {
    pub fn namespace(&self) -> &str {
        self.namespace_labels
            .get(NAMESPACE_NAME_LABEL)
            .map_or("", String::as_str)
    }

    pub(super) fn ports_named<'a>(
        &'a self,
        name: &'a str,
        protocol: Protocol,
    ) -> impl Iterator<Item = u16> + 'a {
        self.named_ports
            .iter()
            .filter(move |p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

/// What a CIDR identity stands for: the ipBlocks containing its addresses, and for the CIDR
/// identity of one pod address targeted by an egress ipBlock rule with a named port, that address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrIdentityKey {
    /// Sorted.
    pub blocks: Vec<Arc<IpBlock>>,
    pub exact: Option<IpAddr>,
}

/// What an identity number means, for flow logs and `explain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityInfo<'a> {
    Reserved(&'static str),
    Pod(&'a PodIdentityKey),
    Cidr(&'a CidrIdentityKey),
}

impl std::fmt::Display for IdentityInfo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdentityInfo::Reserved(name) => f.write_str(name),
            IdentityInfo::Pod(k) => {
                write!(f, "pod ns{:?} labels{:?}", k.namespace_labels, k.labels)?;
                for p in &k.named_ports {
                    write!(f, " {}={}/{}", p.name, p.port, p.protocol)?;
                }
                Ok(())
            }
            IdentityInfo::Cidr(k) => {
                f.write_str("cidr [")?;
                for (i, b) in k.blocks.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{b}")?;
                }
                f.write_str("]")?;
                if let Some(ip) = k.exact {
                    write!(f, " pod {ip}")?;
                }
                Ok(())
            }
        }
    }
}
