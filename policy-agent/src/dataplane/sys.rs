//! The two BPF syscalls aya 0.14 does not wrap for links: reading a TCX link's target and
//! detaching a link synchronously.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;

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
