//! Pinned maps read with raw `bpf(2)` calls (`BPF_OBJ_GET`, `BPF_OBJ_GET_INFO_BY_FD`,
//! `BPF_MAP_GET_NEXT_KEY`): an account of what the kernel holds that owes
//! nothing to aya or to the agent's own map code, for tests that check what the agent reports.
//! The raw call is shared with [`crate::tc_counter`].

use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result, bail, ensure};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `union bpf_attr`, as large as any command used here needs (and zeroed beyond).
#[repr(C, align(8))]
pub(crate) struct Attr(pub(crate) [u8; 128]);

impl Attr {
    pub(crate) fn new() -> Attr {
        Attr([0; 128])
    }

    pub(crate) fn put_u32(&mut self, offset: usize, v: u32) {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
    }

    pub(crate) fn put_u64(&mut self, offset: usize, v: u64) {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

pub(crate) fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised bpf_attr of the size passed; every pointer in it
    // refers to a live buffer of the size the command expects.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A map opened from its bpffs pin.
#[derive(Debug)]
pub struct PinnedMap {
    fd: OwnedFd,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl PinnedMap {
    pub fn open(path: &Path) -> Result<PinnedMap> {
        crate::require_root();
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())?;
        let mut attr = Attr::new();
        // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
        attr.put_u64(0, c_path.as_ptr() as u64);
        let fd = bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("BPF_OBJ_GET {path:?}"))?;
        // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, name, …
        let mut info = [0u32; 32];
        let mut attr = Attr::new();
        // struct { __u32 bpf_fd; __u32 info_len; __aligned_u64 info; }
        attr.put_u32(0, fd.as_raw_fd() as u32);
        attr.put_u32(4, std::mem::size_of_val(&info) as u32);
        attr.put_u64(8, info.as_mut_ptr() as u64);
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)
            .with_context(|| format!("BPF_OBJ_GET_INFO_BY_FD {path:?}"))?;
        Ok(PinnedMap {
            fd,
            map_type: info[0],
            key_size: info[2],
            value_size: info[3],
            max_entries: info[4],
        })
    }

    /// The value under `key` (`BPF_MAP_LOOKUP_ELEM`), `None` when there is none.
    pub fn lookup(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        ensure!(
            key.len() == self.key_size as usize,
            "{}-byte key",
            key.len()
        );
        let mut value = vec![0u8; self.value_size as usize];
        let mut attr = Attr::new();
        // struct { __u32 map_fd; __aligned_u64 key; __aligned_u64 value; __u64 flags; }
        attr.put_u32(0, self.fd.as_raw_fd() as u32);
        attr.put_u64(8, key.as_ptr() as u64);
        attr.put_u64(16, value.as_mut_ptr() as u64);
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => bail!("BPF_MAP_LOOKUP_ELEM: {e}"),
        }
    }

    /// Writes `value` under `key` (`BPF_MAP_UPDATE_ELEM`, `BPF_ANY`): for tests that put the
    /// maps in a state the agent would not.
    pub fn update(&self, key: &[u8], value: &[u8]) -> Result<()> {
        ensure!(
            key.len() == self.key_size as usize,
            "{}-byte key",
            key.len()
        );
        ensure!(
            value.len() == self.value_size as usize,
            "{}-byte value",
            value.len()
        );
        let mut attr = Attr::new();
        attr.put_u32(0, self.fd.as_raw_fd() as u32);
        attr.put_u64(8, key.as_ptr() as u64);
        attr.put_u64(16, value.as_ptr() as u64);
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).context("BPF_MAP_UPDATE_ELEM")?;
        Ok(())
    }

    /// Every key, walked with `BPF_MAP_GET_NEXT_KEY` from no key until `ENOENT`.
    pub fn keys(&self) -> Result<Vec<Vec<u8>>> {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut next = vec![0u8; self.key_size as usize];
        loop {
            ensure!(
                keys.len() <= self.max_entries as usize,
                "walk of a map with {} entries at most did not end",
                self.max_entries
            );
            let mut attr = Attr::new();
            // struct { __u32 map_fd; __aligned_u64 key; __aligned_u64 next_key; __u64 flags; }
            attr.put_u32(0, self.fd.as_raw_fd() as u32);
            // A null key asks for the first one.
            attr.put_u64(8, keys.last().map_or(0, |k| k.as_ptr() as u64));
            attr.put_u64(16, next.as_mut_ptr() as u64);
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => keys.push(next.clone()),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
                Err(e) => bail!("BPF_MAP_GET_NEXT_KEY: {e}"),
            }
        }
    }
}

/// Reads a `#[repr(C)]` plain-data key or value out of the bytes of a map entry.
pub fn read_pod<T: aya::Pod>(bytes: &[u8]) -> Result<T> {
    ensure!(
        bytes.len() == std::mem::size_of::<T>(),
        "{} bytes for a {}-byte {}",
        bytes.len(),
        std::mem::size_of::<T>(),
        std::any::type_name::<T>()
    );
    // SAFETY: the length matches and `T: Pod` is valid for any bit pattern; read_unaligned copes
    // with the buffer's alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}
