//! Errors of the dataplane. Map write failures name the map and the key, and a full map is its
//! own variant so the agent can fail the affected endpoints closed and say why. aya's errors are
//! boxed to keep `Result<_, DataplaneError>` small.

use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{path} is not on a bpffs (mount one with `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid dataplane configuration: {reason}")]
    InvalidConfig { reason: String },
    #[error("parsing the embedded eBPF object: {source}")]
    Object {
        #[source]
        source: Box<aya_obj::ParseError>,
    },
    #[error("loading the eBPF object: {source}")]
    Load {
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("pinned link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("interface {interface}: {source}")]
    Interface {
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error("attaching {program} to {interface}: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("detaching {program} from {interface}: {source}")]
    Detach {
        program: &'static str,
        interface: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("map {map} is full (capacity {capacity}) writing {key}")]
    MapFull {
        map: &'static str,
        key: String,
        capacity: u32,
    },
    #[error("map {map}: writing {key}: {source}")]
    MapUpdate {
        map: &'static str,
        key: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("map {map}: removing {key}: {source}")]
    MapRemove {
        map: &'static str,
        key: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("map {map}: mapping it into memory: {source}")]
    Mmap {
        map: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("endpoint on ifindex {ifindex}: {reason}")]
    InvalidEndpoint { ifindex: u32, reason: String },
    #[error("the events ring buffer was already taken")]
    EventsTaken,
}

impl DataplaneError {
    /// Whether the error is a full map (the agent can shed state or fail endpoints closed).
    pub fn is_map_full(&self) -> bool {
        matches!(self, DataplaneError::MapFull { .. })
    }
}
