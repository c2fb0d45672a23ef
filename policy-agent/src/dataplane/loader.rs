//! Loads the embedded `policy-ebpf` object, attaches its programs to host-side veths and writes
//! its maps.

use aya::{
    Ebpf, include_bytes_aligned,
    maps::{HashMap, LpmTrie, MapData, lpm_trie::Key},
    programs::{SchedClassifier, TcAttachType, tc},
};
use policy_common::{EndpointInfo, IdentityPair, PolicyKey, PolicyValue, map_names, program_names};

/// The eBPF object built by `build.rs`.
pub static EBPF_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object: {source}")]
    Load {
        #[source]
        source: aya::EbpfError,
    },
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching {program} to {interface}: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// A loaded dataplane: the programs and their maps.
pub struct Dataplane {
    ebpf: Ebpf,
}

impl Dataplane {
    /// Loads the object and the programs into the kernel (nothing is attached yet).
    pub fn load() -> Result<Self, DataplaneError> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(|source| DataplaneError::Load { source })?;
        for name in [program_names::FROM_POD, program_names::TO_POD] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        Ok(Self { ebpf })
    }

    /// Attaches `from_pod` (tc ingress) and `to_pod` (tc egress) to a pod's host-side veth in the
    /// current network namespace. TCX on kernels ≥ 6.6, clsact otherwise.
    pub fn attach_endpoint(&mut self, interface: &str) -> Result<(), DataplaneError> {
        // Adding clsact is only needed for the netlink fallback; an existing qdisc is fine.
        let _ = tc::qdisc_add_clsact(interface);
        for (name, attach_type) in [
            (program_names::FROM_POD, TcAttachType::Ingress),
            (program_names::TO_POD, TcAttachType::Egress),
        ] {
            classifier(&mut self.ebpf, name)?
                .attach(interface, attach_type)
                .map_err(|source| DataplaneError::Attach {
                    program: name,
                    interface: interface.to_owned(),
                    source,
                })?;
        }
        Ok(())
    }

    pub fn set_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), DataplaneError> {
        let map = map_names::ENDPOINTS;
        let mut endpoints: HashMap<&mut MapData, u32, EndpointInfo> = self.map(map)?;
        endpoints
            .insert(ifindex, info, 0)
            .map_err(|source| DataplaneError::Map { map, source })
    }

    pub fn set_identity_v4(
        &mut self,
        addr: [u8; 4],
        prefix_len: u32,
        pair: IdentityPair,
    ) -> Result<(), DataplaneError> {
        let map = map_names::IPCACHE_V4;
        let mut trie: LpmTrie<&mut MapData, [u8; 4], IdentityPair> = self.map(map)?;
        trie.insert(&Key::new(prefix_len, addr), pair, 0)
            .map_err(|source| DataplaneError::Map { map, source })
    }

    pub fn insert_policy(
        &mut self,
        key: PolicyKey,
        prefix_len: u32,
        value: PolicyValue,
    ) -> Result<(), DataplaneError> {
        let map = map_names::POLICY;
        let mut trie: LpmTrie<&mut MapData, PolicyKey, PolicyValue> = self.map(map)?;
        trie.insert(&Key::new(prefix_len, key), value, 0)
            .map_err(|source| DataplaneError::Map { map, source })
    }

    fn map<'a, T>(&'a mut self, name: &'static str) -> Result<T, DataplaneError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap { name })?;
        T::try_from(map).map_err(|source| DataplaneError::Map { map: name, source })
    }
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::MissingProgram { name })?;
    program
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}
