//! The BPF syscalls aya 0.14 does not wrap: reading a TCX link's target, detaching a link
//! synchronously, and batch lookups in a map.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_LINK_DETACH: libc::c_long = 34;
/// The kernel's "operation not supported" for a map type without the command (not in libc).
const ENOTSUPP: i32 = 524;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix for `cmd`, of the size given.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The ifindex a TCX link is attached to (`None` once its device is gone). aya's `LinkInfo`
/// does not expose the TCX part of `bpf_link_info`.
pub(crate) fn tcx_target(fd: BorrowedFd<'_>) -> io::Result<Option<u32>> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then an 8-byte aligned union whose
    // `tcx` member starts with { u32 ifindex; u32 attach_type; }.
    let mut info = [0u64; 32];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let ifindex = (info[2] & 0xffff_ffff) as u32;
    Ok((ifindex != 0).then_some(ifindex))
}

/// Detaches a link now (`BPF_LINK_DETACH`); unlinking its pin alone releases it only after an
/// RCU grace period. A link whose device is already gone reports `ENOLINK`, which is fine.
pub(crate) fn link_detach(fd: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct DetachAttr {
        link_fd: u32,
    }
    let mut attr = DetachAttr {
        link_fd: fd.as_raw_fd() as u32,
    };
    match bpf(BPF_LINK_DETACH, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => Ok(()),
        other => other,
    }
}

/// What one [`map_lookup_batch`] call did.
pub(crate) enum Batch {
    /// Entries copied; the walk goes on from `out_batch`.
    More(u32),
    /// Entries copied by the last call of the walk.
    Last(u32),
    /// The map type has no batch lookup on this kernel.
    Unsupported,
}

/// One `BPF_MAP_LOOKUP_BATCH` call copying up to `count` entries into `keys` and `values`
/// (`count` keys and values long), from the position in `in_batch` (`None`: from the start);
/// the position to go on from is written to `out_batch`. For hash maps a position is a bucket
/// index, for the kernel's generic walk (the LPM tries) the last key: a buffer of at least the
/// key size and 8 bytes holds either. `ENOSPC`: one bucket holds more than `count` entries.
pub(crate) fn map_lookup_batch(
    fd: BorrowedFd<'_>,
    in_batch: Option<&[u8]>,
    out_batch: &mut [u8],
    keys: &mut [u8],
    values: &mut [u8],
    count: u32,
) -> io::Result<Batch> {
    /// The `batch` member of `union bpf_attr`.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let mut attr = BatchAttr {
        in_batch: in_batch.map_or(0, |b| b.as_ptr() as u64),
        out_batch: out_batch.as_mut_ptr() as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        Ok(()) => Ok(Batch::More(attr.count)),
        // Past the last bucket; `count` says what this call still copied.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Batch::Last(attr.count)),
        Err(e)
            if in_batch.is_none()
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
                ) =>
        {
            Ok(Batch::Unsupported)
        }
        Err(e) => Err(e),
    }
}
