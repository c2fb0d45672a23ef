//! A unique bpffs pin directory per test, removed (with every pin in it) on drop.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::netns::{run_cmd, unique_name};

const BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs on /sys/fs/bpf unless it already is.
pub fn ensure_bpffs() -> Result<()> {
    crate::require_root();
    let mounted = std::process::Command::new("mountpoint")
        .args(["-q", BPFFS])
        .status()?
        .success();
    if !mounted {
        let out = run_cmd(std::process::Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]));
        // Another test may have mounted it in the meantime.
        if let Err(e) = out
            && !std::process::Command::new("mountpoint")
                .args(["-q", BPFFS])
                .status()?
                .success()
        {
            bail!("cannot mount bpffs on {BPFFS}: {e}");
        }
    }
    Ok(())
}

/// `/sys/fs/bpf/<unique name>`, removed on drop.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new(tag: &str) -> Result<PinDir> {
        ensure_bpffs()?;
        let path = Path::new(BPFFS).join(unique_name(tag));
        std::fs::create_dir_all(&path)?;
        Ok(PinDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
