//! Container images for the real nodes (`lab up --kubelet`), assembled without a registry or a
//! container engine: each is an OCI image layout made with umoci (one layer holding exactly the
//! listed files, on an empty base), written as an OCI archive whose index names the image, which
//! `ctr images import` loads into a node's containerd under that name.
//!
//! - the pause image: the upstream `pause.c` from the pinned `k8s.io/kubernetes` module, compiled
//!   statically, at the reference kubelet and containerd use for pod sandboxes;
//! - agnhost: the upstream e2e suite's client and server (`/agnhost`, static), at the reference
//!   the suite's image manifest names;
//! - the agent: what the `Dockerfile` produces (`/usr/local/bin/policy-agent` with glibc and
//!   libgcc_s, nothing else), from the host's copies of those libraries instead of a distroless
//!   base, at the reference the DaemonSet names (`policy-agent:dev`);
//! - first-packet (`first-packet.c`, static): a pod that sends UDP from its first instant, for
//!   the new-pod check of `cargo xtask e2e`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::net;

/// The image the DaemonSet runs, fully qualified as containerd stores `policy-agent:dev`.
pub const AGENT: &str = "docker.io/library/policy-agent:dev";

/// One image: its reference, entrypoint and files (host path → path in the image).
#[derive(Clone, Debug)]
pub struct Image {
    pub reference: String,
    pub entrypoint: String,
    pub files: Vec<(PathBuf, String)>,
}

/// What a node's containerd imports.
#[derive(Clone, Debug)]
pub struct Built {
    /// OCI archives: pause, agnhost, the agent, first-packet.
    pub archives: Vec<PathBuf>,
    /// The pause image's reference (containerd's `sandbox_image`).
    pub pause: String,
}

/// A pod that sends from its first instant (`first-packet.c`), for the new-pod check of
/// `cargo xtask e2e`.
pub const FIRST_PACKET_IMAGE: &str = "lab.local/first-packet:1";

/// The images a node needs, as OCI archives under `dir`.
pub fn build_all(dir: &Path, agent_bin: &Path, node_bins: &crate::kube::Binaries) -> Result<Built> {
    std::fs::create_dir_all(dir)?;
    let source = kubernetes_source()?;
    let pause_bin = dir.join("pause");
    net::run(
        Command::new("gcc")
            .args(["-Os", "-static", "-o"])
            .arg(&pause_bin)
            .arg(source.join("build/pause/linux/pause.c")),
    )
    .context("compiling the upstream pause.c (gcc, static glibc from libc6-dev)")?;
    let first_packet_src = dir.join("first-packet.c");
    std::fs::write(&first_packet_src, include_str!("first-packet.c"))?;
    let first_packet_bin = dir.join("first-packet");
    net::run(
        Command::new("gcc")
            .args(["-Os", "-static", "-Wall", "-o"])
            .arg(&first_packet_bin)
            .arg(&first_packet_src),
    )
    .context("compiling first-packet.c (gcc, static glibc from libc6-dev)")?;
    let manifest = std::fs::read_to_string(source.join("test/utils/image/manifest.go"))
        .context("reading the e2e suite's image manifest")?;
    let images = [
        Image {
            reference: format!(
                "registry.k8s.io/pause:{}",
                e2e_image_version(&manifest, "Pause", "pause")?
            ),
            entrypoint: "/pause".into(),
            files: vec![(pause_bin, "/pause".into())],
        },
        Image {
            reference: format!(
                "registry.k8s.io/e2e-test-images/agnhost:{}",
                e2e_image_version(&manifest, "Agnhost", "agnhost")?
            ),
            entrypoint: "/agnhost".into(),
            files: vec![(node_bins.path("agnhost"), "/agnhost".into())],
        },
        agent_image(agent_bin)?,
        Image {
            reference: FIRST_PACKET_IMAGE.into(),
            entrypoint: "/first-packet".into(),
            files: vec![(first_packet_bin, "/first-packet".into())],
        },
    ];
    let archives = images
        .iter()
        .enumerate()
        .map(|(i, image)| {
            let out = dir.join(format!("{i}.tar"));
            build(image, &out).with_context(|| format!("assembling image {}", image.reference))?;
            Ok(out)
        })
        .collect::<Result<_>>()?;
    Ok(Built {
        archives,
        pause: images[0].reference.clone(),
    })
}

/// The agent binary and the shared objects it loads (as `ldd` resolves them on this host).
fn agent_image(bin: &Path) -> Result<Image> {
    let ldd = net::output(Command::new("ldd").arg(bin), None)?;
    let mut files = vec![(bin.to_path_buf(), "/usr/local/bin/policy-agent".to_string())];
    for lib in shared_objects(&ldd) {
        files.push((PathBuf::from(&lib), lib));
    }
    Ok(Image {
        reference: AGENT.into(),
        entrypoint: "/usr/local/bin/policy-agent".into(),
        files,
    })
}

/// Paths of the shared objects in `ldd` output (`libc.so.6 => /lib/…/libc.so.6 (0x…)`, and the
/// loader's own line `/lib64/ld-linux-x86-64.so.2 (0x…)`); the vDSO has no file.
fn shared_objects(ldd: &str) -> Vec<String> {
    ldd.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

/// The version the e2e suite's manifest gives an image:
/// `configs[Agnhost] = Config{list.PromoterE2eRegistry, "agnhost", "2.56"}`.
fn e2e_image_version(manifest: &str, config: &str, name: &str) -> Result<String> {
    let key = format!("configs[{config}] = Config{{");
    manifest
        .lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix(&key)?;
            let quoted: Vec<&str> = rest.split('"').skip(1).step_by(2).collect();
            (quoted.first() == Some(&name)).then(|| quoted.get(1).map(|v| v.to_string()))?
        })
        .with_context(|| format!("the e2e image manifest names no version for {name}"))
}

/// The directory of the pinned `k8s.io/kubernetes` module in the Go module cache.
fn kubernetes_source() -> Result<PathBuf> {
    let dir = net::output(
        Command::new("go")
            .current_dir(crate::workspace_root().join("tests").join("kube"))
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-mod=readonly")
            .args(["list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"]),
        None,
    )
    .context("finding the k8s.io/kubernetes module of tests/kube")?;
    let dir = PathBuf::from(dir.trim());
    if !dir.is_dir() {
        bail!(
            "the k8s.io/kubernetes module is not in the Go module cache ({}); run `cargo xtask setup`",
            dir.display()
        );
    }
    Ok(dir)
}

/// One image as an OCI archive at `out`.
fn build(image: &Image, out: &Path) -> Result<()> {
    let work = out.with_extension("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let layout = work.join("layout");
    let bundle = work.join("bundle");
    let tag = format!("{}:img", layout.display());
    let umoci = |args: &[&str]| net::run(Command::new("umoci").args(args));
    umoci(&["init", "--layout", &layout.display().to_string()])?;
    umoci(&["new", "--image", &tag])?;
    umoci(&["unpack", "--image", &tag, &bundle.display().to_string()])?;
    for (src, dst) in &image.files {
        let target = bundle.join("rootfs").join(dst.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().expect("a path in the image"))?;
        std::fs::copy(src, &target)
            .with_context(|| format!("copying {} into the image", src.display()))?;
    }
    umoci(&["repack", "--image", &tag, &bundle.display().to_string()])?;
    umoci(&[
        "config",
        "--image",
        &tag,
        "--os",
        "linux",
        "--architecture",
        "amd64",
        "--config.entrypoint",
        &image.entrypoint,
    ])?;
    umoci(&["gc", "--layout", &layout.display().to_string()])?;
    // The index names the image as containerd's importer reads it.
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
    for m in index["manifests"]
        .as_array_mut()
        .context("index.json has no manifests")?
    {
        m["annotations"] = serde_json::json!({
            "org.opencontainers.image.ref.name": image.reference,
            "io.containerd.image.name": image.reference,
        });
    }
    std::fs::write(&index_path, serde_json::to_vec(&index)?)?;
    net::run(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(out)
            .arg("."),
    )?;
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_objects_of_ldd_output() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x1)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x2)\n\t/lib64/ld-linux-x86-64.so.2 (0x3)\n";
        assert_eq!(
            shared_objects(ldd),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn image_versions_from_the_e2e_manifest() {
        let m = "\tconfigs[Agnhost] = Config{list.PromoterE2eRegistry, \"agnhost\", \"2.56\"}\n\tconfigs[Pause] = Config{list.GcRegistry, \"pause\", \"3.10.1\"}\n";
        assert_eq!(e2e_image_version(m, "Agnhost", "agnhost").unwrap(), "2.56");
        assert_eq!(e2e_image_version(m, "Pause", "pause").unwrap(), "3.10.1");
        assert!(e2e_image_version(m, "Nginx", "nginx").is_err());
    }
}
