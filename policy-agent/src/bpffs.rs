//! Making the bpffs under `--bpffs-dir` reachable.
//!
//! Pins only survive an agent restart if both agents see the *same* bpffs instance (every
//! `mount -t bpf` creates a new, empty one). `ip netns exec` — how the lab runs an agent per node
//! namespace — gives the command a private mount namespace with a fresh sysfs on `/sys`, hiding
//! the host's `/sys/fs/bpf`. So, when the pin directory is under `/sys/fs/bpf` and that is not a
//! bpffs here:
//!
//! - when an ancestor process (the one that ran `ip netns exec`, or further up) — or, if the
//!   launcher is gone, the mount namespace most processes share — has a bpffs on `/sys/fs/bpf`,
//!   the agent joins that mount namespace (`setns`; the network namespace is unchanged, relative
//!   paths keep working). Mounts cannot be bind-mounted across mount namespaces, and paths
//!   through `/proc/<pid>/root` die with that process, so joining is the one robust way. This
//!   must happen while the process is single-threaded: call [`ensure`] first thing in `main`;
//! - otherwise bpffs is mounted on `/sys/fs/bpf`, as `mount -t bpf bpf /sys/fs/bpf` would (what
//!   Cilium and the node setup do). In a private mount namespace that instance dies with the
//!   agent: a warning says pins will not outlive it.
//!
//! Any other directory must already be on a bpffs.

use std::{
    ffi::CString,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const SYS_FS_BPF: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not on a bpffs (mount one: mount -t bpf bpf {path})")]
    NotBpffs { path: PathBuf },
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a valid C string and a zeroed out-parameter of the right type.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut stat) } == 0) && stat.f_type as i64 == BPF_FS_MAGIC
}

fn mount_bpffs(target: &str) -> io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(io::Error::other);
    let (source, target, fstype) = (c("bpf")?, c(target)?, c("bpf")?);
    // SAFETY: valid C strings, no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn mount_ns(pid: &str) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/mnt"))
        .map(|m| m.ino())
        .ok()
}

fn parent_of(pid: &str) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let ppid = rest.split_whitespace().nth(1)?;
    (ppid != "0").then(|| ppid.to_owned())
}

fn bpffs_of(pid: &str) -> Option<PathBuf> {
    let path = PathBuf::from(format!("/proc/{pid}/root{SYS_FS_BPF}"));
    is_bpffs(&path).then_some(path)
}

/// The nearest ancestor in another mount namespace that has a bpffs on `/sys/fs/bpf`; failing
/// that, a process of the mount namespace with a bpffs that most processes share.
fn host_bpffs() -> Option<String> {
    let own = mount_ns("self")?;
    let mut pid = parent_of("self");
    for _ in 0..64 {
        let Some(p) = pid else { break };
        if mount_ns(&p).is_some_and(|ns| ns != own) && bpffs_of(&p).is_some() {
            return Some(p);
        }
        pid = parent_of(&p);
    }
    let mut by_ns: std::collections::BTreeMap<u64, (usize, String)> = Default::default();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Some(ns) = mount_ns(&name).filter(|ns| *ns != own) {
            by_ns.entry(ns).or_insert((0, name)).0 += 1;
        }
    }
    let mut candidates: Vec<(usize, String)> = by_ns.into_values().collect();
    candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
    candidates
        .into_iter()
        .map(|(_, pid)| pid)
        .find(|pid| bpffs_of(pid).is_some())
}

fn single_threaded() -> bool {
    fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Threads:", "1"])
        })
        .unwrap_or(false)
}

/// Joins the mount namespace of `pid`, keeping the working directory.
fn join_mount_namespace(pid: &str) -> io::Result<()> {
    let cwd = std::env::current_dir()?;
    let ns = fs::File::open(format!("/proc/{pid}/ns/mnt"))?;
    // SAFETY: a valid namespace descriptor; the process is single-threaded (checked).
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir(cwd)
}

/// Makes sure `pin_dir` can be created on a bpffs shared with other agents; see the module
/// documentation. Call before any thread is started.
pub fn ensure(pin_dir: &Path) -> Result<Option<String>, BpffsError> {
    let mut existing = pin_dir;
    while !existing.exists() {
        match existing.parent() {
            Some(p) => existing = p,
            None => break,
        }
    }
    if is_bpffs(existing) {
        return Ok(None);
    }
    let root = Path::new(SYS_FS_BPF);
    if !pin_dir.starts_with(root) {
        return Err(BpffsError::NotBpffs {
            path: pin_dir.to_owned(),
        });
    }
    let io_err = |source| BpffsError::Io {
        path: root.to_owned(),
        source,
    };
    fs::create_dir_all(root).map_err(io_err)?;
    let note = match host_bpffs() {
        Some(pid) if single_threaded() => {
            join_mount_namespace(&pid).map_err(io_err)?;
            format!("joined the mount namespace of process {pid} to share its bpffs")
        }
        _ => {
            mount_bpffs(SYS_FS_BPF).map_err(io_err)?;
            format!(
                "mounted a new bpffs on {SYS_FS_BPF}; in a private mount namespace its pins do \
                 not outlive this agent"
            )
        }
    };
    if is_bpffs(root) {
        Ok(Some(note))
    } else {
        Err(BpffsError::NotBpffs {
            path: root.to_owned(),
        })
    }
}
