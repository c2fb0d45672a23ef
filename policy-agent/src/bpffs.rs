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
//!
//! [`ensure`] says which of these happened ([`Outcome`]). In a Kubernetes pod ([`in_pod`]) a
//! bpffs the agent had to mount itself is never the node's: its pins vanish with the container, so
//! a restart loses enforcement until the new agent rebuilds it. The agent still enforces, but
//! [`pod_problem`] keeps it unready and names the fix (the node's `/sys/fs/bpf` as a hostPath with
//! `mountPropagation`).

use std::{
    ffi::{CString, OsString},
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

/// How [`ensure`] made the pin directory reachable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The pin directory (or its nearest existing ancestor) was already on a bpffs.
    Present,
    /// Joined the mount namespace of this process, which has a bpffs on `/sys/fs/bpf`.
    Joined { pid: String },
    /// Mounted a new bpffs instance on `/sys/fs/bpf`: nobody else sees it unless this mount
    /// namespace is the host's.
    Mounted,
}

impl Outcome {
    /// What to log about it (nothing when the bpffs was already there).
    pub fn note(&self) -> Option<String> {
        match self {
            Outcome::Present => None,
            Outcome::Joined { pid } => Some(format!(
                "joined the mount namespace of process {pid} to share its bpffs"
            )),
            Outcome::Mounted => Some(format!(
                "mounted a new bpffs on {SYS_FS_BPF}; in a private mount namespace its pins do \
                 not outlive this agent"
            )),
        }
    }
}

/// Where a Kubernetes container finds its service account (client-go's in-cluster config).
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Whether this process runs in a Kubernetes pod, decided the way Kubernetes clients decide it:
/// `KUBERNETES_SERVICE_HOST` set (and not empty), or a service account mounted at
/// [`SERVICE_ACCOUNT_DIR`]. `env` reads a variable, `exists` tests a path.
pub fn in_pod(env: impl Fn(&str) -> Option<OsString>, exists: impl Fn(&Path) -> bool) -> bool {
    env("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty())
        || exists(Path::new(SERVICE_ACCOUNT_DIR))
}

/// [`in_pod`] for this process.
pub fn in_pod_now() -> bool {
    in_pod(|k| std::env::var_os(k), Path::exists)
}

/// Why the agent must not report ready after `outcome`, when it runs in a pod: a bpffs it mounted
/// itself is the container's own, and everything pinned there is lost on a restart. Outside a
/// pod (the lab, `ip netns exec`) nothing is wrong.
pub fn pod_problem(outcome: &Outcome, in_pod: bool) -> Option<String> {
    (in_pod && *outcome == Outcome::Mounted).then(|| {
        format!(
            "bpffs: {SYS_FS_BPF} in this pod was not a bpffs, so the agent mounted a private one; \
             its pins are lost when the container restarts (enforcement lapses until the next \
             agent rebuilds it). Mount the node's bpffs into the pod: a hostPath volume with path \
             {SYS_FS_BPF} (type Directory), mounted at {SYS_FS_BPF} with mountPropagation: \
             HostToContainer, and bpffs mounted on the node (mount -t bpf bpf {SYS_FS_BPF})"
        )
    })
}

/// Makes sure `pin_dir` can be created on a bpffs shared with other agents; see the module
/// documentation. Call before any thread is started.
pub fn ensure(pin_dir: &Path) -> Result<Outcome, BpffsError> {
    let mut existing = pin_dir;
    while !existing.exists() {
        match existing.parent() {
            Some(p) => existing = p,
            None => break,
        }
    }
    if is_bpffs(existing) {
        return Ok(Outcome::Present);
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
    let outcome = match host_bpffs() {
        Some(pid) if single_threaded() => {
            join_mount_namespace(&pid).map_err(io_err)?;
            Outcome::Joined { pid }
        }
        _ => {
            mount_bpffs(SYS_FS_BPF).map_err(io_err)?;
            Outcome::Mounted
        }
    };
    if is_bpffs(root) {
        Ok(outcome)
    } else {
        Err(BpffsError::NotBpffs {
            path: root.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| {
            vars.iter()
                .find(|(name, _)| name == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn a_pod_is_recognised_by_its_service_env_or_its_service_account() {
        let none = |_: &Path| false;
        assert!(in_pod(
            env(&[("KUBERNETES_SERVICE_HOST", "10.96.0.1")]),
            none
        ));
        assert!(!in_pod(env(&[]), none));
        // An empty variable is not set (client-go's InClusterConfig treats it so).
        assert!(!in_pod(env(&[("KUBERNETES_SERVICE_HOST", "")]), none));
        let account = |p: &Path| p == Path::new(SERVICE_ACCOUNT_DIR);
        assert!(in_pod(env(&[]), account));
        let elsewhere = |p: &Path| p == Path::new("/var/run/secrets");
        assert!(!in_pod(env(&[]), elsewhere));
    }

    #[test]
    fn only_a_private_bpffs_in_a_pod_keeps_the_agent_unready() {
        let joined = Outcome::Joined { pid: "1".into() };
        for in_pod in [false, true] {
            assert_eq!(pod_problem(&Outcome::Present, in_pod), None);
            assert_eq!(pod_problem(&joined, in_pod), None);
        }
        // The lab (ip netns exec) mounts its own too, outside any pod: fine.
        assert_eq!(pod_problem(&Outcome::Mounted, false), None);
        let problem = pod_problem(&Outcome::Mounted, true).expect("a problem in a pod");
        for part in ["private", "hostPath", "mountPropagation", "/sys/fs/bpf"] {
            assert!(problem.contains(part), "{part} in {problem}");
        }
    }

    #[test]
    fn notes_say_what_was_done() {
        assert_eq!(Outcome::Present.note(), None);
        assert!(
            Outcome::Joined { pid: "42".into() }
                .note()
                .is_some_and(|n| n.contains("process 42"))
        );
        assert!(
            Outcome::Mounted
                .note()
                .is_some_and(|n| n.contains("mounted"))
        );
    }
}
