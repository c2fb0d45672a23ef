//! Network-namespace plumbing: named namespaces (`/run/netns/NAME`, as `ip netns` makes them),
//! running code and processes inside them, and iproute2 / nftables invocations.
//!
//! Nothing here touches the root network namespace: code that needs a namespace runs in a thread
//! that `setns()`es into it (network namespaces are per thread), processes are moved in before
//! `exec`, and iproute2 is always called with `-n NAME`.

use std::{
    ffi::CString,
    fs::File,
    io::{self, Write},
    os::{
        fd::AsRawFd,
        unix::{fs::MetadataExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Where `ip netns` keeps its bind mounts.
pub const NETNS_DIR: &str = "/run/netns";

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Names of every named network namespace.
pub fn list_netns() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// The nsfs inode identifying a named namespace (compare with `/proc/PID/ns/net`).
pub fn netns_inode(name: &str) -> Option<u64> {
    std::fs::metadata(netns_path(name)).ok().map(|m| m.ino())
}

pub fn add_netns(name: &str) -> Result<()> {
    run(Command::new("ip").args(["netns", "add", name]))
}

pub fn del_netns(name: &str) -> Result<()> {
    run(Command::new("ip").args(["netns", "del", name]))
}

/// Moves the calling thread into the named network namespace.
pub fn enter_netns(ns: &File) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor; affects only the calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn open_netns(name: &str) -> Result<File> {
    File::open(netns_path(name)).with_context(|| format!("network namespace {name} does not exist"))
}

/// Runs `f` on a thread inside the named network namespace.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let ns = open_netns(name)?;
    thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            enter_netns(&ns).with_context(|| format!("entering network namespace {name}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in network namespace {name} panicked"))?
    })
}

/// Writes a sysctl of the named namespace (`key` like `net/ipv4/ip_forward`). `/proc/sys/net` shows
/// the network namespace of the thread that opens it.
pub fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    in_netns(netns, || {
        std::fs::write(Path::new("/proc/sys").join(key), value)
    })?
    .with_context(|| format!("sysctl {key}={value} in {netns}"))
}

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<()> {
    output(cmd, None).map(|_| ())
}

/// Runs a command with optional stdin, returning stdout; fails with stderr on a non-zero exit.
pub fn output(cmd: &mut Command, stdin: Option<&str>) -> Result<String> {
    let desc = describe(cmd);
    let out = output_of(cmd, stdin)?;
    if !out.status.success() {
        bail!(
            "{desc} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command with optional stdin and returns its exit status and output, whatever the
/// status (for callers that report failures their own way).
pub fn output_of(cmd: &mut Command, stdin: Option<&str>) -> Result<std::process::Output> {
    let desc = describe(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {desc}"))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes())
            .with_context(|| format!("writing stdin of {desc}"))?;
    }
    child
        .wait_with_output()
        .with_context(|| format!("waiting for {desc}"))
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    if s.len() > 200 {
        s.truncate(200);
        s.push('…');
    }
    s
}

/// `ip -n NETNS -batch -` with one command per line.
pub fn ip_batch(netns: &str, lines: &[String]) -> Result<()> {
    let script = lines.join("\n") + "\n";
    output(
        Command::new("ip").args(["-n", netns, "-batch", "-"]),
        Some(&script),
    )
    .with_context(|| format!("ip commands in {netns}:\n{script}"))
    .map(|_| ())
}

/// Loads an nftables script inside the named namespace.
pub fn nft(netns: &str, script: &str) -> Result<()> {
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"]);
    set_netns(&mut cmd, netns, NetnsMode::Net)?;
    output(&mut cmd, Some(script))
        .with_context(|| format!("nftables in {netns}"))
        .map(|_| ())
}

/// How a child process enters a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetnsMode {
    /// Only the network namespace (plain `setns`), for short-lived tools.
    Net,
    /// The network namespace and a new session, so the process outlives the terminal of `lab up`.
    Daemon,
    /// Like `ip netns exec` — a private mount namespace with `/sys` remounted so `/sys/class/net`
    /// describes the network namespace — but keeping the host's bpffs at `/sys/fs/bpf`, so pins
    /// stay visible to (and removable by) everyone else (`ip netns exec` itself hides bpffs).
    /// Plus a new session, as [`NetnsMode::Daemon`].
    DaemonWithSysfs,
}

/// Arranges for `cmd` to run inside the named network namespace.
pub fn set_netns(cmd: &mut Command, netns: &str, mode: NetnsMode) -> Result<()> {
    let ns = open_netns(netns)?;
    let root = CString::new("/").expect("no NUL");
    let sys = CString::new("/sys").expect("no NUL");
    let sysfs = CString::new("sysfs").expect("no NUL");
    let bpf = CString::new("/sys/fs/bpf").expect("no NUL");
    let empty = CString::new("").expect("no NUL");
    let keep_bpffs = is_mountpoint(Path::new("/sys/fs/bpf"));
    // SAFETY: the closure only makes async-signal-safe syscalls on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if mode == NetnsMode::Net {
                return Ok(());
            }
            check(libc::setsid())?;
            if mode == NetnsMode::Daemon {
                return Ok(());
            }
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ))?;
            let tree = if keep_bpffs {
                let fd = libc::syscall(
                    libc::SYS_open_tree,
                    libc::AT_FDCWD,
                    bpf.as_ptr(),
                    OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as libc::c_uint,
                );
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                Some(fd as libc::c_int)
            } else {
                None
            };
            check(libc::umount2(sys.as_ptr(), libc::MNT_DETACH))?;
            check(libc::mount(
                sysfs.as_ptr(),
                sys.as_ptr(),
                sysfs.as_ptr(),
                0,
                std::ptr::null(),
            ))?;
            if let Some(fd) = tree {
                let r = libc::syscall(
                    libc::SYS_move_mount,
                    fd,
                    empty.as_ptr(),
                    libc::AT_FDCWD,
                    bpf.as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH,
                );
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

const OPEN_TREE_CLONE: libc::c_uint = 0x1;
const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether `path` is the root of a mount (its device differs from its parent's).
pub fn is_mountpoint(path: &Path) -> bool {
    let (Ok(me), Some(parent)) = (std::fs::metadata(path), path.parent()) else {
        return false;
    };
    std::fs::metadata(parent)
        .map(|p| p.dev() != me.dev())
        .unwrap_or(false)
}

/// Spawns a long-running process inside a namespace with stdout/stderr appended to `log`.
pub fn spawn_daemon(mut cmd: Command, netns: &str, mode: NetnsMode, log: &Path) -> Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    set_netns(&mut cmd, netns, mode)?;
    let desc = describe(&cmd);
    cmd.spawn()
        .with_context(|| format!("starting {desc} in {netns}"))
}

/// Whether a process exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The command line of a process, arguments joined by spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Every process whose network namespace is the named one.
pub fn pids_in_netns(name: &str) -> Vec<u32> {
    let Some(ino) = netns_inode(name) else {
        return Vec::new();
    };
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == ino)
        })
        .collect()
}

/// Sends `signal` to each process, then waits up to `grace` for them to go; SIGKILLs the rest.
pub fn terminate(pids: &[u32], signal: libc::c_int, grace: Duration) {
    for &pid in pids {
        // SAFETY: plain syscall.
        unsafe { libc::kill(pid as libc::pid_t, signal) };
    }
    let deadline = Instant::now() + grace;
    while pids.iter().any(|&p| process_alive(p)) && Instant::now() < deadline {
        reap();
        thread::sleep(Duration::from_millis(10));
    }
    for &pid in pids.iter().filter(|&&p| process_alive(p)) {
        // SAFETY: plain syscall.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| process_alive(p)) && Instant::now() < deadline {
        reap();
        thread::sleep(Duration::from_millis(5));
    }
}

/// Collects exited children of this process (responders started in this invocation).
fn reap() {
    loop {
        // SAFETY: plain syscall.
        let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if r <= 0 {
            break;
        }
    }
}

/// Random bytes from the kernel.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: writes at most N - filled bytes into buf.
        let r = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if r > 0 {
            filled += r as usize;
        }
    }
    buf
}

pub fn random_u32() -> u32 {
    u32::from_ne_bytes(random_bytes())
}
