//! Loading the embedded `policy-ebpf` object and adopting what a previous agent left pinned.
//!
//! Pin layout under the configured bpffs directory (`--bpffs-dir`):
//!
//! ```text
//! <dir>/maps/<MAP>                  every map of the object (policy_common::map_names::ALL)
//! <dir>/programs/<program>          from_pod, to_pod, to_network (the newest load)
//! <dir>/links/<program>:<ifname>    TCX links (':' cannot occur in an interface name)
//! ```
//!
//! Restart without a gap: [`Dataplane::open`] reopens the pinned maps (conntrack, counters and
//! the policy state survive and the old programs keep using them), loads the new programs
//! against those maps, then swaps every pinned link to the new program with `BPF_LINK_UPDATE`,
//! which is atomic: each packet runs either the old or the new program, never none. The agent
//! then recomputes its desired state and calls [`Dataplane::sync`], which writes only the
//! difference. A pinned map whose definition changed between versions cannot be reused; it is
//! replaced (logged), which loses its contents.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    maps::{Array, MapData, MapInfo},
    programs::SchedClassifier,
};
use policy_common::{Config, EndpointInfo, capacity, map_names, program_names};

use super::attach::{AttachMode, Attachment};
use super::error::DataplaneError;
use super::slots::EndpointSlots;
use super::writer::Shadow;

/// The eBPF object built by `build.rs`.
pub static EBPF_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy-ebpf"));

/// Programs loaded from the object and pinned (all of them are `SchedClassifier`s). The
/// object's `noop` is not among them: only the per-packet benchmark loads it
/// ([`Dataplane::load_unpinned`]).
pub(crate) const PROGRAMS: [&str; 3] = [
    program_names::FROM_POD,
    program_names::TO_POD,
    program_names::TO_NETWORK,
];

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A loaded dataplane: programs, maps, the interfaces they are attached to, and a shadow of
/// what the agent has written (for diffs, generations and map pressure).
pub struct Dataplane {
    pub(crate) ebpf: Ebpf,
    pub(crate) pin_dir: PathBuf,
    pub(crate) config: Config,
    pub(crate) mode: AttachMode,
    pub(crate) attachments: BTreeMap<String, Attachment>,
    pub(crate) shadow: Shadow,
    pub(crate) slots: EndpointSlots,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("pin_dir", &self.pin_dir)
            .field("mode", &self.mode)
            .field("attached", &self.attachments.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Dataplane {
    /// Loads the programs, reopening (or creating) the maps pinned under `pin_dir`, writes
    /// `config`, and adopts every link pinned by a previous run (swapping it to the new program).
    /// Attaches with TCX links on kernels that have them (≥ 6.6), clsact filters otherwise.
    ///
    /// Call it from the network namespace the interfaces live in: a pinned link is adopted only
    /// if its interface still exists there under the same name (otherwise its pin is removed).
    pub fn open(pin_dir: &Path, config: Config) -> Result<Dataplane, DataplaneError> {
        Self::open_with_mode(pin_dir, config, AttachMode::detect())
    }

    /// [`Dataplane::open`] with an explicit attachment mechanism.
    pub fn open_with_mode(
        pin_dir: &Path,
        config: Config,
        mode: AttachMode,
    ) -> Result<Dataplane, DataplaneError> {
        validate_config(&config)?;
        prepare_pin_dir(pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        replace_incompatible_pins(&maps_dir)?;

        let mut loader = EbpfLoader::new();
        for name in map_names::ALL {
            loader.map_pin_path(name, maps_dir.join(name));
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|source| DataplaneError::Load {
                source: Box::new(source),
            })?;
        for name in PROGRAMS {
            classifier_mut(&mut ebpf, name)?
                .load()
                .map_err(|source| DataplaneError::Program {
                    name,
                    source: Box::new(source),
                })?;
        }
        pin_programs(&mut ebpf, &pin_dir.join("programs"))?;

        let slots = EndpointSlots::map(&ebpf)?;
        let mut dataplane = Dataplane {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            config,
            mode,
            attachments: BTreeMap::new(),
            shadow: Shadow::default(),
            slots,
        };
        dataplane.write_config()?;
        dataplane.shadow = Shadow::read(&dataplane.ebpf)?;
        // Before the links move to the new programs, which read the slots first.
        dataplane.slots.rewrite(&dataplane.shadow.endpoints);
        dataplane.adopt_links()?;
        Ok(dataplane)
    }

    /// What the kernel maps hold now, read back entry by entry (not the record of what this
    /// process wrote): for `/explain`.
    pub fn kernel_view(&self) -> Result<crate::live::KernelView, DataplaneError> {
        let mut shadow = Shadow::read(&self.ebpf)?;
        // The programs take a written slot over the ENDPOINTS entry (equal unless a write is
        // under way); its value is what they act on.
        for (ifindex, info) in shadow.endpoints.iter_mut() {
            if let Some(slot) = self.slots.load(*ifindex) {
                *info = EndpointInfo {
                    identity: info.identity,
                    ..slot
                };
            }
        }
        Ok(crate::live::KernelView {
            endpoints: shadow.endpoints,
            ipcache_v4: shadow.ipcache_v4,
            ipcache_v6: shadow.ipcache_v6,
            policy: shadow.policy,
        })
    }

    /// The bpffs directory everything is pinned under.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn config(&self) -> Config {
        self.config
    }

    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    /// Replaces the runtime settings (mark bits, timeouts, event switches).
    pub fn set_config(&mut self, config: Config) -> Result<(), DataplaneError> {
        validate_config(&config)?;
        self.config = config;
        self.write_config()
    }

    fn write_config(&mut self) -> Result<(), DataplaneError> {
        let map = map_names::CONFIG;
        let config = Config {
            kernel_hz: kernel_hz()?,
            ..self.config
        };
        let mut array: Array<&mut MapData, Config> = typed_map_mut(&mut self.ebpf, map)?;
        array
            .set(0, config, 0)
            .map_err(|source| DataplaneError::MapUpdate {
                map,
                key: "0".to_owned(),
                source: Box::new(source),
            })
    }

    /// Loads one more program of the object into the kernel, unpinned and attached nowhere, for
    /// `BPF_PROG_TEST_RUN` (the per-packet benchmark's `noop` floor). The agent never calls it.
    pub fn load_unpinned(&mut self, name: &'static str) -> Result<(), DataplaneError> {
        classifier_mut(&mut self.ebpf, name)?
            .load()
            .map_err(|source| DataplaneError::Program {
                name,
                source: Box::new(source),
            })
    }

    /// A loaded program, for `BPF_PROG_TEST_RUN` (tests and the per-packet benchmark).
    pub fn program(&self, name: &'static str) -> Result<&SchedClassifier, DataplaneError> {
        let program = self
            .ebpf
            .program(name)
            .ok_or(DataplaneError::MissingProgram { name })?;
        program
            .try_into()
            .map_err(|source| DataplaneError::Program {
                name,
                source: Box::new(source),
            })
    }

    /// Detaches everything and removes every pin (uninstall). Packets flow unpoliced afterwards.
    pub fn remove_pins(mut self) -> Result<(), DataplaneError> {
        let names: Vec<String> = self.attachments.keys().cloned().collect();
        for ifname in names {
            self.detach(&ifname)?;
        }
        let dir = self.pin_dir.clone();
        // Closing our descriptors first is not required: unlinking a pin only drops its
        // reference; the objects go away with their last user.
        drop(self);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DataplaneError::Io { path: dir, source }),
        }
    }

    /// Endpoints currently in the ENDPOINTS map (after a restart: what the previous agent wrote),
    /// so that the agent can remove the ones it no longer knows.
    pub fn endpoints(&self) -> Vec<(u32, EndpointInfo)> {
        self.shadow
            .endpoints
            .iter()
            .map(|(ifindex, info)| (*ifindex, *info))
            .collect()
    }
}

/// The running kernel's tick rate (`CONFIG_HZ`), the unit of conntrack's clock: the coarse
/// clocks advance once per tick, so their resolution is one tick (`TICK_NSEC`, 1e9 / HZ rounded).
pub(crate) fn kernel_hz() -> Result<u32, DataplaneError> {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } != 0 {
        return Err(DataplaneError::InvalidConfig {
            reason: format!(
                "kernel tick rate: clock_getres(CLOCK_MONOTONIC_COARSE): {}",
                std::io::Error::last_os_error()
            ),
        });
    }
    let tick_ns = res.tv_sec as u64 * 1_000_000_000 + res.tv_nsec as u64;
    if !(1_000..=1_000_000_000).contains(&tick_ns) {
        return Err(DataplaneError::InvalidConfig {
            reason: format!("kernel tick rate: the coarse clock's resolution is {tick_ns} ns"),
        });
    }
    Ok(((1_000_000_000 + tick_ns / 2) / tick_ns) as u32)
}

fn validate_config(config: &Config) -> Result<(), DataplaneError> {
    let mask = config.mark_mask;
    let invalid = |reason: String| Err(DataplaneError::InvalidConfig { reason });
    if mask == 0 {
        return Ok(());
    }
    if mask & 0xc000 != 0 {
        return invalid(format!(
            "mark mask {mask:#x} overlaps kube-proxy's 0x4000/0x8000 bits"
        ));
    }
    let shift = mask.trailing_zeros();
    if config.mark_shift != shift {
        return invalid(format!(
            "mark shift {} is not the lowest bit of mask {mask:#x} ({shift})",
            config.mark_shift
        ));
    }
    let bits = mask >> shift;
    if bits & (bits.wrapping_add(1)) != 0 {
        return invalid(format!("mark mask {mask:#x} is not contiguous"));
    }
    if bits < capacity::ENDPOINTS - 1 {
        return invalid(format!(
            "mark mask {mask:#x} cannot hold endpoint ids up to {}",
            capacity::ENDPOINTS - 1
        ));
    }
    Ok(())
}

fn prepare_pin_dir(pin_dir: &Path) -> Result<(), DataplaneError> {
    for sub in ["maps", "programs", "links"] {
        let path = pin_dir.join(sub);
        fs::create_dir_all(&path).map_err(|source| DataplaneError::Io {
            path: path.clone(),
            source,
        })?;
    }
    let c_path = std::ffi::CString::new(pin_dir.as_os_str().as_encoded_bytes()).map_err(|e| {
        DataplaneError::Io {
            path: pin_dir.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        }
    })?;
    // SAFETY: a valid C string and a zeroed out-parameter of the right type.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(DataplaneError::Io {
            path: pin_dir.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    if stat.f_type as i64 != BPF_FS_MAGIC {
        return Err(DataplaneError::NotBpffs {
            path: pin_dir.to_owned(),
        });
    }
    Ok(())
}

/// Removes map pins whose type, key, value or capacity differ from the object's definition, so
/// that the loader creates them afresh instead of handing the programs a map they misread.
fn replace_incompatible_pins(maps_dir: &Path) -> Result<(), DataplaneError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(|source| DataplaneError::Object {
        source: Box::new(source),
    })?;
    for (name, def) in &object.maps {
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let compatible = match MapInfo::from_pin(&path) {
            Ok(info) => {
                info.map_type().ok().map(|t| t as u32) == Some(def.map_type())
                    && info.key_size() == def.key_size()
                    && info.value_size() == def.value_size()
                    && info.max_entries() == def.max_entries()
            }
            Err(_) => false,
        };
        if !compatible {
            tracing::warn!(map = %name, path = %path.display(), "pinned map has another definition; replacing it (its contents are lost)");
            fs::remove_file(&path).map_err(|source| DataplaneError::Io {
                path: path.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

/// Pins the newly loaded programs, replacing the previous run's pins (links keep the old
/// programs alive until they are swapped). A pin of a program the agent no longer loads (an
/// earlier version's `noop`) is removed.
fn pin_programs(ebpf: &mut Ebpf, dir: &Path) -> Result<(), DataplaneError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DataplaneError::Io { path, source }
    };
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let known = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| PROGRAMS.contains(&n));
        if !known {
            fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    for name in PROGRAMS {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(DataplaneError::Io { path, source }),
        }
        classifier_mut(ebpf, name)?
            .pin(&path)
            .map_err(|source| DataplaneError::Pin {
                path,
                source: Box::new(source),
            })?;
    }
    Ok(())
}

pub(crate) fn classifier_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::MissingProgram { name })?;
    program
        .try_into()
        .map_err(|source| DataplaneError::Program {
            name,
            source: Box::new(source),
        })
}

/// A typed view of one map of the object.
pub(crate) fn typed_map_mut<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<T, DataplaneError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .map_mut(name)
        .ok_or(DataplaneError::MissingMap { name })?;
    T::try_from(map).map_err(|source| DataplaneError::Map {
        map: name,
        source: Box::new(source),
    })
}

/// A typed read-only view of one map of the object.
pub(crate) fn typed_map<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.map(name).ok_or(DataplaneError::MissingMap { name })?;
    T::try_from(map).map_err(|source| DataplaneError::Map {
        map: name,
        source: Box::new(source),
    })
}
