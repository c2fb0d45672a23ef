//! What the dataplane reports: per-reason packet counters, map pressure, and the verdict event
//! stream.

use std::{io, mem::size_of};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use policy_common::{
    CtKey, CtValue, FragKey, FragValue, Reason, VerdictEvent, capacity, map_names,
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

    /// Entries per map against capacity. The agent-written maps come from the writer's shadow;
    /// CONNTRACK and FRAGMENTS are walked (one syscall per entry: call it at scrape rate, not
    /// per packet).
    pub fn map_usage(&self) -> Result<Vec<MapUsage>, DataplaneError> {
        let s = &self.shadow;
        // /32 and /128 entries live in IPCACHE_EXACT.
        let exact_v4 = s.ipcache_v4.keys().filter(|n| n.prefix() == 32).count() as u64;
        let exact_v6 = s.ipcache_v6.keys().filter(|n| n.prefix() == 128).count() as u64;
        let mut usage = vec![
            MapUsage {
                map: map_names::ENDPOINTS,
                entries: s.endpoints.len() as u64,
                capacity: capacity::ENDPOINTS,
            },
            MapUsage {
                map: map_names::IPCACHE_EXACT,
                entries: exact_v4 + exact_v6,
                capacity: capacity::IPCACHE_EXACT,
            },
            MapUsage {
                map: map_names::IPCACHE_V4,
                entries: s.ipcache_v4.len() as u64 - exact_v4,
                capacity: capacity::IPCACHE_V4,
            },
            MapUsage {
                map: map_names::IPCACHE_V6,
                entries: s.ipcache_v6.len() as u64 - exact_v6,
                capacity: capacity::IPCACHE_V6,
            },
            MapUsage {
                map: map_names::POLICY,
                entries: s.policy.len() as u64,
                capacity: capacity::POLICY,
            },
            MapUsage {
                map: map_names::SERVICES,
                entries: s.services.len() as u64,
                capacity: capacity::SERVICES,
            },
        ];
        let ct: BpfHashMap<&MapData, CtKey, CtValue> = typed_map(&self.ebpf, map_names::CONNTRACK)?;
        usage.push(MapUsage {
            map: map_names::CONNTRACK,
            entries: ct.keys().filter(Result::is_ok).count() as u64,
            capacity: capacity::CONNTRACK,
        });
        let frags: BpfHashMap<&MapData, FragKey, FragValue> =
            typed_map(&self.ebpf, map_names::FRAGMENTS)?;
        usage.push(MapUsage {
            map: map_names::FRAGMENTS,
            entries: frags.keys().filter(Result::is_ok).count() as u64,
            capacity: capacity::FRAGMENTS,
        });
        Ok(usage)
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

/// Reads [`VerdictEvent`]s from the EVENTS ring buffer.
pub struct EventReader {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl EventReader {
    /// Waits until at least one event is available, then appends everything available to `out`.
    pub async fn read(&mut self, out: &mut Vec<VerdictEvent>) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable_mut().await?;
            let n = drain(guard.get_inner_mut(), out);
            guard.clear_ready();
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
