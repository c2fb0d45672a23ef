//! Verdict events on the EVENTS ring buffer, rate-limited per CPU (CONFIG.events_per_sec in
//! one-second windows). A full ring buffer or an exhausted budget loses the event, never the
//! verdict: the per-CPU counters still count every packet.
//!
//! Waking the agent's reader costs a context switch on the node. A drop wakes it as soon as the
//! reader has caught up (the kernel's default); an allowed new flow (flow records, audit) wakes it
//! only once [`WAKEUP_BACKLOG`] bytes are waiting, so that a burst of new connections costs one
//! wakeup per batch instead of one per connection. The reader drains at least every 100 ms
//! without a wakeup (`policy-agent/src/dataplane/stats.rs`), which bounds how late such a record
//! arrives.
//!
//! The budget runs on conntrack's clock, kernel ticks (`decide::now`: tick resolution is plenty
//! for one-second windows, and reading it is one load where `bpf_ktime_get_ns`, which only an
//! event that is actually sent pays for its timestamp, is a helper call): under a flood of drops
//! nearly every packet is over budget.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_NO_WAKEUP},
    helpers::bpf_ktime_get_ns,
};
use policy_common::{Config, VerdictEvent, addr_octets};

use crate::decide::{self, Verdict};
use crate::maps::{EVENT_RATE, EVENTS};
use crate::parse::Packet;

/// Waiting bytes from which an allowed flow's record wakes the reader: 64 records.
const WAKEUP_BACKLOG: u64 = 64 * core::mem::size_of::<VerdictEvent>() as u64;

#[inline(always)]
fn within_budget(config: &Config, now: u64) -> bool {
    // One second of ticks; a config without the tick rate sends nothing.
    let window = config.kernel_hz as u64;
    if config.events_per_sec == 0 || window == 0 {
        return false;
    }
    let Some(rate) = EVENT_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, no concurrent writer on this CPU.
    let rate = unsafe { &mut *rate };
    if now.saturating_sub(rate[0]) >= window {
        rate[0] = now;
        rate[1] = 0;
    }
    if rate[1] >= config.events_per_sec as u64 {
        return false;
    }
    rate[1] += 1;
    true
}

#[inline(always)]
pub fn emit(ifindex: u32, pkt: &Packet, verdict: &Verdict, config: &Config) {
    if !within_budget(config, decide::now()) {
        return;
    }
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(mut entry) = EVENTS.reserve::<VerdictEvent>(0) else {
        return;
    };
    entry.write(VerdictEvent {
        ts_ns: now,
        src: addr_octets(pkt.src),
        dst: addr_octets(pkt.dst),
        sport: pkt.sport,
        dport: pkt.dport,
        ifindex,
        endpoint: verdict.endpoint,
        reason: verdict.reason as u32,
        rule: verdict.rule,
        peer_identity: verdict.peer_identity,
        protocol: pkt.protocol,
        direction: verdict.direction as u8,
        family: pkt.family,
        _pad: 0,
        _pad2: 0,
    });
    let wake =
        if verdict.reason.is_drop() || EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_BACKLOG {
            0
        } else {
            BPF_RB_NO_WAKEUP as u64
        };
    entry.submit(wake);
}
