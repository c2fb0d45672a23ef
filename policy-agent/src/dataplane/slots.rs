//! ENDPOINT_SLOTS, the agent's side: the array mapped into the agent's memory, each slot stored
//! whole with one atomic 8-byte store (layout and invariant: [`EndpointSlot`]).
//!
//! `bpf_map_update_elem` on an array copies the value with the kernel's `memcpy`, which may
//! store it in pieces; a program reading the slot meanwhile could pair one write's generation
//! with another's flags. Stores through the mapping are single `mov`s, and the programs read
//! the slot with a single load, so each packet sees one whole value.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::{Ebpf, maps::Map};
use policy_common::{EndpointInfo, EndpointSlot, capacity, map_names};

use super::error::DataplaneError;

const MAP: &str = map_names::ENDPOINT_SLOTS;
const LEN: usize = capacity::ENDPOINT_SLOTS as usize;
const BYTES: usize = LEN * size_of::<u64>();

/// A shared, writable mapping of the ENDPOINT_SLOTS array.
pub(crate) struct EndpointSlots {
    base: NonNull<AtomicU64>,
}

// SAFETY: the mapping is plain shared memory owned by this value; every access is atomic.
unsafe impl Send for EndpointSlots {}
// SAFETY: as above.
unsafe impl Sync for EndpointSlots {}

impl EndpointSlots {
    /// Maps the array of `ebpf` (created with `BPF_F_MMAPABLE`, as the object declares it).
    pub(crate) fn map(ebpf: &Ebpf) -> Result<EndpointSlots, DataplaneError> {
        let data = match ebpf.map(MAP) {
            Some(Map::Array(data)) => data,
            _ => return Err(DataplaneError::MissingMap { name: MAP }),
        };
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's whole value area (the kernel checks the
        // length and that the map is mmapable); nothing else in this process aliases it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(DataplaneError::Mmap {
                map: MAP,
                source: io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(base.cast::<AtomicU64>()).ok_or(DataplaneError::Mmap {
            map: MAP,
            source: io::Error::other("mmap returned a null mapping"),
        })?;
        Ok(EndpointSlots { base })
    }

    fn slot(&self, ifindex: u32) -> Option<&AtomicU64> {
        let index = ifindex as usize;
        // SAFETY: in bounds of the mapping, which lives as long as `self`; u64-aligned (page
        // aligned base).
        (index < LEN).then(|| unsafe { &*self.base.as_ptr().add(index) })
    }

    /// Stores the slot of `ifindex` (an ifindex past the array has none: the programs use
    /// ENDPOINTS for it). `info` comes from the writer, which checks the id's range; a value the
    /// layout cannot hold empties the slot, which also sends the programs to ENDPOINTS.
    pub(crate) fn store(&self, ifindex: u32, info: &EndpointInfo) {
        if let Some(slot) = self.slot(ifindex) {
            let value = EndpointSlot::pack(info).unwrap_or(EndpointSlot::EMPTY);
            slot.store(value.0, Ordering::Release);
        }
    }

    /// Empties the slot of `ifindex`.
    pub(crate) fn clear(&self, ifindex: u32) {
        if let Some(slot) = self.slot(ifindex) {
            slot.store(EndpointSlot::EMPTY.0, Ordering::Release);
        }
    }

    /// The slot of `ifindex` as the programs read it.
    pub(crate) fn load(&self, ifindex: u32) -> Option<EndpointInfo> {
        EndpointSlot(self.slot(ifindex)?.load(Ordering::Acquire)).unpack()
    }

    /// Rewrites every slot from `endpoints` (ifindex → endpoint) and empties the rest: an
    /// earlier agent may have stopped between its ENDPOINTS write and its slot store.
    pub(crate) fn rewrite<'a>(
        &self,
        endpoints: impl IntoIterator<Item = (&'a u32, &'a EndpointInfo)>,
    ) {
        let mut wanted = vec![EndpointSlot::EMPTY.0; LEN];
        for (&ifindex, info) in endpoints {
            if let Some(value) = wanted.get_mut(ifindex as usize) {
                *value = EndpointSlot::pack(info).unwrap_or(EndpointSlot::EMPTY).0;
            }
        }
        for (ifindex, value) in wanted.into_iter().enumerate() {
            let slot = self.slot(ifindex as u32).expect("index below LEN");
            if slot.load(Ordering::Relaxed) != value {
                slot.store(value, Ordering::Release);
            }
        }
    }
}

impl Drop for EndpointSlots {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), BYTES) };
    }
}
