//! Installation checks besides the bpffs (`bpffs`) and the mark mask (`marks`): the agent is
//! installed, or says loudly that it is not.
//!
//! - **RLIMIT_MEMLOCK.** Before Linux 5.11, BPF maps and programs are charged to the locked-memory
//!   limit (since 5.11 to the memory cgroup instead), and the usual limits (64 KiB, 8 MiB) are far
//!   below what the agent's maps take. On those kernels the limit is raised to infinity before
//!   loading; a failure is logged, and loading then fails with its own error if the limit really
//!   is too low.
//! - **Uplinks.** Service traffic of egress-isolated pods to backends on other nodes is decided by
//!   `to_network` on the uplink and tunnel devices. When no device got it, that traffic leaves
//!   unchecked: warned once per change, and `policy_agent_uplinks_attached` is 0.

use std::io;

use aya::util::KernelVersion;
use tracing::{debug, info, warn};

/// The first kernel that charges BPF memory to the memory cgroup instead of RLIMIT_MEMLOCK.
pub const MEMCG_BPF_ACCOUNTING: KernelVersion = KernelVersion::new(5, 11, 0);

/// Whether RLIMIT_MEMLOCK must be raised before loading on `kernel`.
pub fn memlock_needs_raising(kernel: KernelVersion) -> bool {
    kernel < MEMCG_BPF_ACCOUNTING
}

/// Raises RLIMIT_MEMLOCK to infinity on kernels older than 5.11; leaves it alone otherwise. Logs
/// what it did; a failure is a warning (fatal only in that loading fails afterwards).
pub fn raise_memlock() {
    let kernel = match KernelVersion::current() {
        Ok(k) => k,
        Err(e) => {
            warn!(error = %e, "kernel version unknown; RLIMIT_MEMLOCK left as it is");
            return;
        }
    };
    if !memlock_needs_raising(kernel) {
        debug!(%kernel, "BPF memory is charged to the memory cgroup; RLIMIT_MEMLOCK left as it is");
        return;
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit value.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        info!(
            %kernel,
            "kernel older than 5.11 charges BPF memory to RLIMIT_MEMLOCK: raised it to infinity"
        );
    } else {
        warn!(
            %kernel,
            error = %io::Error::last_os_error(),
            "raising RLIMIT_MEMLOCK to infinity failed (kernels older than 5.11 charge BPF maps \
             to it); loading fails if the current limit is too low"
        );
    }
}

/// A change in whether any uplink carries `to_network`, worth one log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UplinkChange {
    /// No device got `to_network` (first sync, or every device was lost since).
    Missing,
    /// Devices got it again after none had.
    Restored,
}

/// What to log after a sync attached `to_network` to `now` devices, when the previous sync
/// attached `previous` (`None` before the first sync): only changes, not every sync.
pub fn uplink_change(previous: Option<usize>, now: usize) -> Option<UplinkChange> {
    match (previous, now) {
        (None, 0) | (Some(1..), 0) => Some(UplinkChange::Missing),
        (Some(0), 1..) => Some(UplinkChange::Restored),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memlock_is_raised_only_before_memcg_accounting() {
        for (major, minor, patch, raise) in [
            (4, 19, 0, true),
            (5, 4, 250, true),
            (5, 10, 200, true),
            (5, 11, 0, false),
            (5, 15, 0, false),
            (6, 6, 1, false),
        ] {
            assert_eq!(
                memlock_needs_raising(KernelVersion::new(major, minor, patch)),
                raise,
                "{major}.{minor}.{patch}"
            );
        }
    }

    #[test]
    fn a_missing_uplink_is_warned_once_per_change() {
        use UplinkChange::*;
        assert_eq!(uplink_change(None, 0), Some(Missing));
        assert_eq!(uplink_change(None, 2), None);
        assert_eq!(uplink_change(Some(0), 0), None, "not again on every sync");
        assert_eq!(uplink_change(Some(2), 0), Some(Missing));
        assert_eq!(uplink_change(Some(0), 1), Some(Restored));
        assert_eq!(uplink_change(Some(1), 3), None);
    }
}
