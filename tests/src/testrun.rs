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

pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;

/// The result of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// `TC_ACT_OK` or `TC_ACT_SHOT`.
    pub action: i32,
    /// `skb->mark` after the program.
    pub mark: u32,
}

impl Run {
    pub fn passed(&self) -> bool {
        self.action == TC_ACT_OK
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
        action: result.return_value as i32,
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
    Ok((result.duration, result.return_value as i32))
}
