//! What the dataplane reports: per-reason packet counters, map pressure, and the verdict event
//! stream.

use std::{io, mem::size_of};

use aya::maps::{
    HashMap as BpfHashMap, IterableMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf,
};
use policy_common::{
    Addr, CtKey, CtValue, EndpointInfo, FragKey, FragValue, IdentityPair, PolicyGroupKey,
    PortRanges, Reason, ServiceKey, VerdictEvent, map_names,
};
use tokio::io::{Interest, unix::AsyncFd};

use super::error::DataplaneError;
use super::loader::{Dataplane, typed_map};
use super::writer::MapUsage;

impl Dataplane {
    /// Packets per [`Reason`] since the maps were created, summed over CPUs (every reason, zeros
    /// included, in [`Reason::ALL`] order).
    pub fn counters(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        let map = map_names::COUNTERS;
        let counters: PerCpuArray<&MapData, u64> = typed_map(&self.ebpf, map)?;
        Reason::ALL
            .iter()
            .map(|&reason| {
                let values =
                    counters
                        .get(&(reason as u32), 0)
                        .map_err(|source| DataplaneError::Map {
                            map,
                            source: Box::new(source),
                        })?;
                Ok((reason, values.iter().sum()))
            })
            .collect()
    }

    /// The packet count of one reason.
    pub fn counter(&self, reason: Reason) -> Result<u64, DataplaneError> {
        Ok(self
            .counters()?
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| n))
    }

    /// Entries in each of the maps that fill up ([`map_names::COUNTED`]), counted in the kernel
    /// by walking the map's keys, against the map's own `max_entries`. One syscall per entry
    /// (CONNTRACK can hold 262,144): call it at scrape rate, not per packet.
    pub fn map_usage(&self) -> Result<Vec<MapUsage>, DataplaneError> {
        map_names::COUNTED
            .iter()
            .map(|&map| self.usage_of(map))
            .collect()
    }

    /// [`Dataplane::map_usage`] of one map: the typed view only decides the key size.
    fn usage_of(&self, map: &'static str) -> Result<MapUsage, DataplaneError> {
        let ebpf = &self.ebpf;
        match map {
            map_names::ENDPOINTS | map_names::ENDPOINTS_BY_ID => {
                let m: BpfHashMap<&MapData, u32, EndpointInfo> = typed_map(ebpf, map)?;
                count_keys(map, m.map(), m.keys())
            }
            map_names::IPCACHE_EXACT => {
                let m: BpfHashMap<&MapData, Addr, IdentityPair> = typed_map(ebpf, map)?;
                count_keys(map, m.map(), m.keys())
            }
            map_names::IPCACHE_V4 => {
                let m: LpmTrie<&MapData, [u8; 4], IdentityPair> = typed_map(ebpf, map)?;
                count_keys(map, m.map(), m.keys())
            }
            map_names::IPCACHE_V6 => {
                let m: LpmTrie<&MapData, [u8; 16], IdentityPair> = typed_map(ebpf, map)?;
                count_keys(map, m.map(), m.keys())
            }
            map_names::POLICY => {
                let m: BpfHashMap<&MapData, PolicyGroupKey, PortRanges> = typed_map(ebpf, map)?;
                count_keys(map, m.map(), m.keys())
            }
            map_names::SERVICES => {
                let m: BpfHashMap<&MapData, ServiceKey, u32> = typed_map(ebpf, map)?;
                count_keys(map, m.map(), m.keys())
            }
            map_names::CONNTRACK => {
                let m: BpfHashMap<&MapData, CtKey, CtValue> = typed_map(ebpf, map)?;
                count_keys(map, m.map(), m.keys())
            }
            map_names::FRAGMENTS => {
                let m: BpfHashMap<&MapData, FragKey, FragValue> = typed_map(ebpf, map)?;
                count_keys(map, m.map(), m.keys())
            }
            _ => Err(DataplaneError::MissingMap { name: map }),
        }
    }

    /// Conntrack entries (for tests and `explain`-style tooling).
    pub fn conntrack_entries(&self) -> Result<Vec<(CtKey, CtValue)>, DataplaneError> {
        let map = map_names::CONNTRACK;
        let ct: BpfHashMap<&MapData, CtKey, CtValue> = typed_map(&self.ebpf, map)?;
        ct.iter()
            .map(|item| {
                item.map_err(|source| DataplaneError::Map {
                    map,
                    source: Box::new(source),
                })
            })
            .collect()
    }

    /// Takes the EVENTS ring buffer (once). The reader is driven from tokio: create it inside a
    /// runtime.
    pub fn events(&mut self) -> Result<EventReader, DataplaneError> {
        let map = map_names::EVENTS;
        let taken = self.ebpf.take_map(map).ok_or(DataplaneError::EventsTaken)?;
        let ring = RingBuf::try_from(taken).map_err(|source| DataplaneError::Map {
            map,
            source: Box::new(source),
        })?;
        // SAFETY: the ring buffer owns its map descriptor and keeps it open (and the same) for
        // as long as it lives, which is as long as the AsyncFd.
        let fd =
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
                DataplaneError::Io {
                    path: self.pin_dir.join("maps").join(map),
                    source: e.into_parts().1,
                }
            })?;
        Ok(EventReader { fd })
    }
}

/// Counts `keys` of `data`. A key deleted under the walk (the programs evict CONNTRACK and
/// FRAGMENTS entries at any time) makes the kernel restart it from the first key, so the walk
/// stops at the map's capacity: the count is never above what the map can hold.
fn count_keys<K>(
    map: &'static str,
    data: &MapData,
    keys: impl Iterator<Item = Result<K, MapError>>,
) -> Result<MapUsage, DataplaneError> {
    let err = |source| DataplaneError::Map {
        map,
        source: Box::new(source),
    };
    let capacity = data.info().map_err(err)?.max_entries();
    let mut entries = 0;
    for key in keys.take(capacity as usize) {
        key.map_err(err)?;
        entries += 1;
    }
    Ok(MapUsage {
        map,
        entries,
        capacity,
    })
}

/// Reads [`VerdictEvent`]s from the EVENTS ring buffer.
/// How often [`EventReader::read`] drains the ring buffer when no wakeup came.
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

pub struct EventReader {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl EventReader {
    /// Waits until at least one event is available, then appends everything available to `out`.
    /// The programs wake the reader for drops and for batches of allowed flows only
    /// (`policy-ebpf/src/events.rs`): every [`DRAIN_INTERVAL`] it looks without a wakeup.
    pub async fn read(&mut self, out: &mut Vec<VerdictEvent>) -> io::Result<usize> {
        loop {
            // Readiness cleared before draining: anything submitted after it signals again.
            if let Ok(guard) = tokio::time::timeout(DRAIN_INTERVAL, self.fd.readable_mut()).await {
                guard?.clear_ready();
            }
            let n = drain(self.fd.get_mut(), out);
            if n > 0 {
                return Ok(n);
            }
        }
    }

    /// Appends the events available now to `out`, without waiting.
    pub fn try_read(&mut self, out: &mut Vec<VerdictEvent>) -> usize {
        drain(self.fd.get_mut(), out)
    }
}

fn drain(ring: &mut RingBuf<MapData>, out: &mut Vec<VerdictEvent>) -> usize {
    let mut n = 0;
    while let Some(item) = ring.next() {
        if item.len() >= size_of::<VerdictEvent>() {
            // SAFETY: the record holds at least one VerdictEvent written by the program; any bit
            // pattern is a valid VerdictEvent; read_unaligned copes with the record's alignment.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<VerdictEvent>()) });
            n += 1;
        }
    }
    n
}
