//! Running the tc programs on hand-built packets with `BPF_PROG_TEST_RUN`.
//!
//! The skb context passed in sets `mark` (the Service mark path) and leaves `ifindex` 0, so the
//! kernel runs the program on the loopback device of the caller's network namespace: its
//! ifindex, 1, is the ENDPOINTS key of the endpoint under test.

use std::time::Duration;

use anyhow::{Context, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};

/// `sizeof(struct __sk_buff)`.
pub const SKB_CTX_LEN: usize = 192;
const MARK_OFFSET: usize = 8;

/// The ifindex test runs see (loopback).
pub const TEST_IFINDEX: u32 = 1;

/// "Deliver, and end the chain": what the programs never return (it would skip the programs
/// after ours on the hook).
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
/// "No verdict, go on to the next program" (`TCX_NEXT` in TCX mode): what the programs return
/// for every packet they do not drop. BPF_PROG_TEST_RUN reports the return value as a `u32`, so
/// it arrives as `0xffff_ffff`; [`action`] turns it back into -1.
pub const TC_ACT_UNSPEC: i32 = -1;

/// The tc action of a program's return value as BPF_PROG_TEST_RUN reports it (a `u32`).
pub const fn action(return_value: u32) -> i32 {
    return_value as i32
}

/// The result of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// `TC_ACT_UNSPEC` (allowed) or `TC_ACT_SHOT` (dropped).
    pub action: i32,
    /// `skb->mark` after the program.
    pub mark: u32,
}

impl Run {
    /// Allowed: the program let the packet go on to the next one on the hook.
    pub fn passed(&self) -> bool {
        self.action == TC_ACT_UNSPEC
    }
}

fn ctx_with_mark(mark: u32) -> [u8; SKB_CTX_LEN] {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[MARK_OFFSET..MARK_OFFSET + 4].copy_from_slice(&mark.to_ne_bytes());
    ctx
}

/// Runs `program` once on `packet` with `skb->mark = mark`.
pub fn run(program: &SchedClassifier, packet: &[u8], mark: u32) -> Result<Run> {
    let ctx_in = ctx_with_mark(mark);
    let mut ctx_out = [0u8; SKB_CTX_LEN];
    let mut data_out = vec![0u8; packet.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut data_out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            repeat: 1,
            ..Default::default()
        })
        .with_context(|| format!("BPF_PROG_TEST_RUN on {} bytes", packet.len()))?;
    let mark = u32::from_ne_bytes(ctx_out[MARK_OFFSET..MARK_OFFSET + 4].try_into()?);
    Ok(Run {
        action: action(result.return_value),
        mark,
    })
}

/// Runs `program` `repeat` times on `packet` in the kernel; returns the mean time per run and
/// the last return value.
pub fn time(program: &SchedClassifier, packet: &[u8], repeat: u32) -> Result<(Duration, i32)> {
    let ctx_in = ctx_with_mark(0);
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            ctx_in: Some(&ctx_in),
            repeat,
            ..Default::default()
        })
        .with_context(|| format!("BPF_PROG_TEST_RUN on {} bytes", packet.len()))?;
    Ok((result.duration, action(result.return_value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspec_comes_back_from_the_u32_return_value() {
        assert_eq!(action(0xffff_ffff), TC_ACT_UNSPEC);
        assert_eq!(action(2), TC_ACT_SHOT);
        assert_eq!(action(0), TC_ACT_OK);
    }
}
