//! Attaching the programs to interfaces, and keeping them attached across agent restarts.
//!
//! - TCX (kernel ≥ 6.6): one bpf link per hook, pinned at `<dir>/links/<program>:<ifname>`. The
//!   pin keeps the link (and so the program) attached while no agent runs; the next agent takes
//!   the pinned link and swaps its program atomically (`BPF_LINK_UPDATE`). Links are appended
//!   after programs already attached (a CNI's own tc programs keep their order).
//! - clsact (older kernels): a cls_bpf filter at a fixed priority and handle per hook; the
//!   filter survives the agent by itself, and the next agent replaces it in place (netlink
//!   `RTM_NEWTFILTER` without `NLM_F_EXCL` on the same priority/handle).
//!
//! Our programs return `TC_ACT_SHOT` for a drop and `TC_ACT_UNSPEC` (-1, `TCX_NEXT`) for
//! everything else, never `TC_ACT_OK`: an allowed packet goes on to whatever runs after us on the
//! hook (TCX links after ours; cls_bpf filters at a later priority than ours, `NL_PRIORITY`; and
//! in TCX mode a clsact qdisc's filters, which the kernel runs behind the TCX chain), so a CNI's
//! own tc programs keep working beside ours. With nothing after us the packet is delivered.
//!
//! Names are resolved in the calling thread's network namespace (netlink and TCX both take the
//! ifindex there), so an agent running for a node namespace must attach from inside it.

use std::{fs, io, path::PathBuf};

use aya::{
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, Link as _, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    },
    util::KernelVersion,
};
use policy_common::program_names;

use super::error::DataplaneError;
use super::loader::{Dataplane, classifier_mut};
use super::sys;
use aya::programs::MultiProgLink as _;

/// clsact filter priority and handle used by every hook (fixed so a restarted agent replaces its
/// own filter instead of adding a second one). Priority 1 runs before any other filter; filters
/// at higher numbers run after ours for every packet we do not drop.
const NL_PRIORITY: u16 = 1;
const NL_HANDLE: TcHandle = TcHandle::new(0, 0x5eb);

/// How programs are attached to interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX bpf links (kernel ≥ 6.6), pinned.
    Tcx,
    /// clsact qdisc + cls_bpf filters (netlink).
    Clsact,
}

impl AttachMode {
    /// TCX where the kernel has it, clsact otherwise.
    pub fn detect() -> AttachMode {
        match KernelVersion::current() {
            Ok(v) if v >= KernelVersion::new(6, 6, 0) => AttachMode::Tcx,
            _ => AttachMode::Clsact,
        }
    }
}

/// What an interface is to the dataplane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A local pod's host-side veth: `from_pod` on tc ingress, `to_pod` on tc egress.
    Endpoint,
    /// An uplink or tunnel device: `to_network` on tc egress.
    Uplink,
}

impl Role {
    fn hooks(self) -> &'static [Hook] {
        match self {
            Role::Endpoint => &[Hook::FromPod, Hook::ToPod],
            Role::Uplink => &[Hook::ToNetwork],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hook {
    FromPod,
    ToPod,
    ToNetwork,
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::FromPod => program_names::FROM_POD,
            Hook::ToPod => program_names::TO_POD,
            Hook::ToNetwork => program_names::TO_NETWORK,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::FromPod => TcAttachType::Ingress,
            Hook::ToPod | Hook::ToNetwork => TcAttachType::Egress,
        }
    }

    fn from_program(name: &str) -> Option<Hook> {
        [Hook::FromPod, Hook::ToPod, Hook::ToNetwork]
            .into_iter()
            .find(|h| h.program() == name)
    }
}

/// One interface we are attached to.
#[derive(Debug)]
pub(crate) struct Attachment {
    role: Role,
    links: Vec<(Hook, HookLink)>,
}

#[derive(Debug)]
enum HookLink {
    /// Pinned TCX link; dropping the descriptor leaves the pin (and the attachment) in place.
    Tcx {
        link: SchedClassifierLink,
        pin: PathBuf,
    },
    /// clsact filter at (`NL_PRIORITY`, `NL_HANDLE`); outlives us by itself.
    Clsact,
}

impl Dataplane {
    /// Attaches `from_pod` (tc ingress) and `to_pod` (tc egress) to a pod's host-side veth.
    /// Write the endpoint ([`Dataplane::upsert_endpoint`]) first: packets on an attached veth
    /// without an ENDPOINTS entry are dropped. Idempotent.
    pub fn attach_endpoint(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        self.attach(ifname, Role::Endpoint)
    }

    /// Attaches `to_network` (tc egress) to an uplink or tunnel device. Idempotent.
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        self.attach(ifname, Role::Uplink)
    }

    /// Interfaces we are attached to, with their role (adopted ones included).
    pub fn attached(&self) -> Vec<(String, Role)> {
        self.attachments
            .iter()
            .map(|(name, a)| (name.clone(), a.role))
            .collect()
    }

    fn attach(&mut self, ifname: &str, role: Role) -> Result<(), DataplaneError> {
        if let Some(existing) = self.attachments.get(ifname) {
            if existing.role == role && existing.links.len() == role.hooks().len() {
                return Ok(());
            }
            self.detach(ifname)?;
        }
        let mut links = Vec::new();
        for &hook in role.hooks() {
            match self.attach_hook(ifname, hook) {
                Ok(link) => links.push((hook, link)),
                Err(e) => {
                    // Leave nothing half-attached behind.
                    for (hook, link) in links {
                        let _ = self.release(ifname, hook, link);
                    }
                    return Err(e);
                }
            }
        }
        self.attachments
            .insert(ifname.to_owned(), Attachment { role, links });
        Ok(())
    }

    /// Detaches our programs from `ifname` and removes their pins. An interface that no longer
    /// exists is simply forgotten.
    pub fn detach(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        let Some(attachment) = self.attachments.remove(ifname) else {
            return Ok(());
        };
        let mut result = Ok(());
        for (hook, link) in attachment.links {
            if let Err(e) = self.release(ifname, hook, link) {
                result = Err(e);
            }
        }
        result
    }

    fn link_pin(&self, ifname: &str, hook: Hook) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("{}:{ifname}", hook.program()))
    }

    fn attach_hook(&mut self, ifname: &str, hook: Hook) -> Result<HookLink, DataplaneError> {
        let program = hook.program();
        let attach_err = |source| DataplaneError::Attach {
            program,
            interface: ifname.to_owned(),
            source: Box::new(source),
        };
        match self.mode {
            AttachMode::Tcx => {
                let pin = self.link_pin(ifname, hook);
                if pin.exists()
                    && let Some(link) = self.adopt_tcx(ifname, hook, &pin)?
                {
                    return Ok(link);
                }
                let prog = classifier_mut(&mut self.ebpf, program)?;
                let id = prog
                    .attach_with_options(
                        ifname,
                        hook.attach_type(),
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(attach_err)?;
                let link = prog.take_link(id).map_err(attach_err)?;
                let fd_link = FdLink::try_from(link).map_err(|source| DataplaneError::Link {
                    path: pin.clone(),
                    source: Box::new(source),
                })?;
                let pinned = fd_link.pin(&pin).map_err(|source| DataplaneError::Pin {
                    path: pin.clone(),
                    source: Box::new(source),
                })?;
                let link =
                    SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| {
                        DataplaneError::Link {
                            path: pin.clone(),
                            source: Box::new(source),
                        }
                    })?;
                Ok(HookLink::Tcx { link, pin })
            }
            AttachMode::Clsact => {
                match tc::qdisc_add_clsact(ifname) {
                    Ok(()) => {}
                    Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(TcError::IoError(source)) => {
                        return Err(DataplaneError::Interface {
                            interface: ifname.to_owned(),
                            source,
                        });
                    }
                    Err(e) => return Err(attach_err(e.into())),
                }
                let prog = classifier_mut(&mut self.ebpf, program)?;
                // Replace our filter of a previous run in place, else create it.
                let replaced = SchedClassifierLink::attached(
                    ifname,
                    hook.attach_type(),
                    NL_PRIORITY,
                    NL_HANDLE,
                    None,
                )
                .map_err(|source| DataplaneError::Interface {
                    interface: ifname.to_owned(),
                    source,
                })
                .and_then(|old| prog.attach_to_link(old).map_err(attach_err));
                let id = match replaced {
                    Ok(id) => id,
                    Err(_) => prog
                        .attach_with_options(
                            ifname,
                            hook.attach_type(),
                            TcAttachOptions::Netlink(NlOptions {
                                priority: NL_PRIORITY,
                                handle: NL_HANDLE,
                                classid: None,
                            }),
                        )
                        .map_err(attach_err)?,
                };
                let link = prog.take_link(id).map_err(attach_err)?;
                // The filter must outlive this process: never run the link's detaching Drop.
                std::mem::forget(link);
                Ok(HookLink::Clsact)
            }
        }
    }

    /// Takes over a pinned TCX link and points it at the newly loaded program. `None` when the
    /// link is stale (its interface is gone or now another one): its pin is removed.
    fn adopt_tcx(
        &mut self,
        ifname: &str,
        hook: Hook,
        pin: &PathBuf,
    ) -> Result<Option<HookLink>, DataplaneError> {
        let link_err = |source| DataplaneError::Link {
            path: pin.clone(),
            source: Box::new(source),
        };
        let pinned = PinnedLink::from_pin(pin).map_err(link_err)?;
        let fd_link: FdLink = pinned.into();
        let link = SchedClassifierLink::try_from(fd_link).map_err(link_err)?;
        let target = link.fd().map_err(link_err).and_then(|fd| {
            sys::tcx_target(fd).map_err(|source| DataplaneError::Io {
                path: pin.clone(),
                source,
            })
        })?;
        let current = ifindex_of(ifname);
        if target.is_none() || target != current {
            drop(link);
            remove_pin(pin)?;
            return Ok(None);
        }
        let program = hook.program();
        let prog: &mut SchedClassifier = classifier_mut(&mut self.ebpf, program)?;
        let attach_err = |source| DataplaneError::Attach {
            program,
            interface: ifname.to_owned(),
            source: Box::new(source),
        };
        let id = prog.attach_to_link(link).map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        Ok(Some(HookLink::Tcx {
            link,
            pin: pin.clone(),
        }))
    }

    fn release(&mut self, ifname: &str, hook: Hook, link: HookLink) -> Result<(), DataplaneError> {
        match link {
            HookLink::Tcx { link, pin } => {
                // Detach first (synchronous), then forget the pin and the descriptor.
                let detached = link
                    .fd()
                    .map_err(|source| DataplaneError::Link {
                        path: pin.clone(),
                        source: Box::new(source),
                    })
                    .and_then(|fd| {
                        sys::link_detach(fd).map_err(|source| DataplaneError::Io {
                            path: pin.clone(),
                            source,
                        })
                    });
                remove_pin(&pin)?;
                detached
            }
            HookLink::Clsact => {
                let Ok(link) = SchedClassifierLink::attached(
                    ifname,
                    hook.attach_type(),
                    NL_PRIORITY,
                    NL_HANDLE,
                    None,
                ) else {
                    // The interface is gone, and its filters with it.
                    return Ok(());
                };
                match link.detach() {
                    Ok(()) => Ok(()),
                    Err(_) if ifindex_of(ifname).is_none() => Ok(()),
                    Err(source) => Err(DataplaneError::Detach {
                        program: hook.program(),
                        interface: ifname.to_owned(),
                        source: Box::new(source),
                    }),
                }
            }
        }
    }

    /// Adopts every link a previous run pinned (TCX mode). Stale pins are removed.
    pub(crate) fn adopt_links(&mut self) -> Result<(), DataplaneError> {
        let dir = self.pin_dir.join("links");
        let entries = fs::read_dir(&dir).map_err(|source| DataplaneError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut found: Vec<(String, Hook, PathBuf)> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| DataplaneError::Io {
                path: dir.clone(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let parsed = name
                .split_once(':')
                .and_then(|(program, ifname)| Some((Hook::from_program(program)?, ifname)));
            match parsed {
                Some((hook, ifname)) => found.push((ifname.to_owned(), hook, entry.path())),
                None => tracing::warn!(pin = %entry.path().display(), "unknown pin ignored"),
            }
        }
        if self.mode != AttachMode::Tcx {
            return Ok(());
        }
        for (ifname, hook, pin) in found {
            let role = match hook {
                Hook::FromPod | Hook::ToPod => Role::Endpoint,
                Hook::ToNetwork => Role::Uplink,
            };
            if let Some(link) = self.adopt_tcx(&ifname, hook, &pin)? {
                let attachment = self
                    .attachments
                    .entry(ifname)
                    .or_insert_with(|| Attachment {
                        role,
                        links: Vec::new(),
                    });
                attachment.links.push((hook, link));
            }
        }
        Ok(())
    }
}

fn remove_pin(pin: &PathBuf) -> Result<(), DataplaneError> {
    match fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DataplaneError::Io {
            path: pin.clone(),
            source,
        }),
    }
}

fn ifindex_of(ifname: &str) -> Option<u32> {
    let name = std::ffi::CString::new(ifname).ok()?;
    // SAFETY: a valid C string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => None,
        index => Some(index),
    }
}
