//! What the dataplane reports: per-reason packet counters, map pressure, and the verdict event
//! stream.

use std::{io, mem::size_of};

use aya::{
    maps::{HashMap as BpfHashMap, IterableMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf},
    sys::SyscallError,
};
use policy_common::{
    Addr, CtKey, CtValue, EndpointInfo, FragKey, FragValue, IdentityPair, PolicyGroupKey,
    PortRanges, Reason, ServiceKey, VerdictEvent, map_names,
};
use tokio::io::{Interest, unix::AsyncFd};

use super::error::DataplaneError;
use super::loader::{Dataplane, typed_map};
use super::sys::{self, Batch};
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
    /// (batch lookups, or a key walk where the kernel has none), against the map's own
    /// `max_entries`. A full CONNTRACK (262,144 entries) costs 64 batch syscalls that copy every
    /// entry: call it at scrape rate, not per packet.
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

/// Counts the entries of `data`: with `BPF_MAP_LOOKUP_BATCH` where the kernel has it for the map
/// (hash and LRU hash maps since Linux 5.6, and the LPM tries on current kernels), a few thousand
/// entries per syscall; otherwise by walking `keys`, one syscall per entry.
///
/// A key deleted under the walk (the programs evict CONNTRACK and FRAGMENTS entries at any time)
/// makes a key walk restart from the first key, so the count stops at the map's capacity: it is
/// never above what the map can hold.
fn count_keys<K>(
    map: &'static str,
    data: &MapData,
    keys: impl Iterator<Item = Result<K, MapError>>,
) -> Result<MapUsage, DataplaneError> {
    let err = |source| DataplaneError::Map {
        map,
        source: Box::new(source),
    };
    let info = data.info().map_err(err)?;
    let capacity = info.max_entries();
    let batched =
        batch_count(data, info.key_size(), info.value_size(), capacity).map_err(|io_error| {
            err(MapError::SyscallError(SyscallError {
                call: "BPF_MAP_LOOKUP_BATCH",
                io_error,
            }))
        })?;
    let entries = match batched {
        Some(n) => n,
        None => {
            let mut n = 0;
            for key in keys.take(capacity as usize) {
                key.map_err(err)?;
                n += 1;
            }
            n
        }
    };
    Ok(MapUsage {
        map,
        entries: entries.min(u64::from(capacity)),
        capacity,
    })
}

/// Entries a `BPF_MAP_LOOKUP_BATCH` call asks for at most.
const BATCH: u32 = 4096;

/// The entries of a map counted with `BPF_MAP_LOOKUP_BATCH`, or `None` when the kernel has no
/// batch lookup for this map type (the caller walks keys instead). For hash maps the kernel
/// copies whole buckets, so the walk sees each entry present throughout it once.
fn batch_count(
    data: &MapData,
    key_size: u32,
    value_size: u32,
    capacity: u32,
) -> io::Result<Option<u64>> {
    use std::os::fd::AsFd;
    let mut chunk = BATCH.min(capacity.max(1));
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    let position = vec![0u8; key_size.max(8) as usize];
    let (mut from, mut to) = (position.clone(), position);
    let mut first = true;
    let mut entries = 0u64;
    while entries < u64::from(capacity) {
        keys.resize(key_size as usize * chunk as usize, 0u8);
        values.resize(value_size as usize * chunk as usize, 0u8);
        let in_batch = (!first).then_some(from.as_slice());
        match sys::map_lookup_batch(
            data.fd().as_fd(),
            in_batch,
            &mut to,
            &mut keys,
            &mut values,
            chunk,
        ) {
            Ok(Batch::More(n)) => {
                entries += u64::from(n);
                std::mem::swap(&mut from, &mut to);
                first = false;
            }
            Ok(Batch::Last(n)) => return Ok(Some(entries + u64::from(n))),
            Ok(Batch::Unsupported) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && chunk < capacity => {
                chunk = (chunk * 2).min(capacity);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Some(entries))
}

/// How often [`EventReader::read`] drains the ring buffer when no wakeup came.
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Reads [`VerdictEvent`]s from the EVENTS ring buffer.
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
