//! `cargo xtask fuzz`: the property tests of `policy-agent/tests/properties.rs`, over and over
//! with fresh seeds and more cases per run than the default (fixed-seed) `cargo test`.
//!
//! Each run sets `POLICY_FUZZ_SEED` (the seed every proptest block starts from) and
//! `POLICY_FUZZ_SCALE` (the factor on each block's number of cases). A failing case is shrunk
//! by proptest and appended to `policy-agent/proptest-regressions/properties.txt`, so the plain
//! `cargo test` replays it from then on; the seed and the command that repeats the whole run are
//! printed, and the command fails.

use std::{
    io::Read,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::workspace_root;

const TEST_ARGS: [&str; 5] = ["test", "-p", "policy-agent", "--test", "properties"];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Keep starting runs with fresh seeds for this long.
    #[arg(long, default_value_t = 10)]
    pub minutes: u64,
    /// Run once with this seed (repeats a failed run).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Cases per run, as a multiple of the default run's (10,000 over the three properties).
    #[arg(long, default_value_t = 4)]
    pub scale: u64,
}

pub fn main(args: Args) -> Result<()> {
    let scale = args.scale.max(1);
    // Build once, so the runs time the tests only.
    let mut build = cargo_test(None, scale);
    build.arg("--no-run");
    let status = build.status().context("spawning cargo")?;
    if !status.success() {
        bail!("building the property tests failed: {status}");
    }
    if let Some(seed) = args.seed {
        return run(seed, scale, 1);
    }
    let deadline = Instant::now() + Duration::from_secs(args.minutes * 60);
    let mut runs = 0;
    let mut seeds = Vec::new();
    while runs == 0 || Instant::now() < deadline {
        let seed = fresh_seed()?;
        runs += 1;
        run(seed, scale, runs)?;
        seeds.push(seed);
    }
    println!(
        "fuzz: {runs} runs passed, {scale}× the default cases each (seeds {})",
        seeds
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// One run of the property tests from `seed`.
fn run(seed: u64, scale: u64, n: u32) -> Result<()> {
    println!("fuzz: run {n}: seed {seed}, {scale}× the default cases");
    let started = Instant::now();
    let status = cargo_test(Some(seed), scale)
        .arg("--quiet")
        .status()
        .context("spawning cargo")?;
    if !status.success() {
        eprintln!(
            "fuzz: seed {seed} FAILED ({status}).\n\
             fuzz: proptest appended the shrunk case to \
             policy-agent/proptest-regressions/properties.txt (plain `cargo test` replays it).\n\
             fuzz: repeat this run with\n    \
             cargo xtask fuzz --seed {seed} --scale {scale}\n\
             fuzz: or\n    \
             POLICY_FUZZ_SEED={seed} POLICY_FUZZ_SCALE={scale} cargo {}",
            TEST_ARGS.join(" ")
        );
        bail!("property tests failed with seed {seed}");
    }
    println!(
        "fuzz: seed {seed} passed in {:.0?}",
        Duration::from_secs(started.elapsed().as_secs())
    );
    Ok(())
}

fn cargo_test(seed: Option<u64>, scale: u64) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(TEST_ARGS)
        .current_dir(workspace_root())
        .env("POLICY_FUZZ_SCALE", scale.to_string());
    if let Some(seed) = seed {
        cmd.env("POLICY_FUZZ_SEED", seed.to_string());
    }
    cmd
}

/// 64 bits from the kernel's random source.
fn fresh_seed() -> Result<u64> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(u64::from_ne_bytes(b))
}
