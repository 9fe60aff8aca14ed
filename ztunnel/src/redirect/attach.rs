//! TCX links, pinned so they outlive the process.
//!
//! Each link is pinned as `<pin-dir>/links/<role>-<ifname>-<ifindex>`; the
//! ifindex in the name tells a recreated veth (a pod restarted under the same
//! name) from the one the old link was made for. The pins are the source of
//! truth for what is attached: a link without a pin is detached once ztunnel
//! drops its file descriptor.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::programs::{
    links::{FdLink, LinkError, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    LinkOrder, SchedClassifier, TcAttachType,
};

use super::{routing::Interface, RedirectError};

/// Which program a link runs, and so which hook it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A pod's host-side veth.
    Pod,
    /// A device traffic from other nodes arrives on.
    Uplink,
}

impl Role {
    fn prefix(self) -> &'static str {
        match self {
            Role::Pod => "pod",
            Role::Uplink => "uplink",
        }
    }
}

/// What [`attach`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// A new link was made and pinned.
    New,
    /// A pinned link from an earlier ztunnel was found and now runs this
    /// process's program (replaced atomically: no packet sees no program).
    Readopted,
}

/// The pin file name of a link.
pub fn pin_name(role: Role, iface: &Interface) -> String {
    format!("{}-{}-{}", role.prefix(), iface.name, iface.index)
}

/// Attaches `program` at the TC ingress of `iface`, first in the TCX chain
/// (before a CNI's programs, which keep running for packets ztunnel leaves
/// alone), or takes over the pinned link an earlier ztunnel left there.
pub fn attach(
    program: &mut SchedClassifier,
    links_dir: &Path,
    role: Role,
    iface: &Interface,
) -> Result<Attached, RedirectError> {
    let path = links_dir.join(pin_name(role, iface));
    let err = |message: String| RedirectError::Attach {
        iface: iface.name.clone(),
        message,
    };
    match PinnedLink::from_pin(&path) {
        Ok(pinned) => {
            // Keep the pin in place: it is what keeps the link alive. We only
            // swap the program the link runs.
            let fd_link = FdLink::from(pinned);
            let link = SchedClassifierLink::try_from(fd_link).map_err(|e| {
                err(format!(
                    "pinned link {} is not a TC link: {e}",
                    path.display()
                ))
            })?;
            let id = program
                .attach_to_link(link)
                .map_err(|e| err(format!("replacing the program of {}: {e}", path.display())))?;
            // Dropping our handle closes our fd; the pin holds the link.
            drop(program.take_link(id).map_err(|e| err(e.to_string()))?);
            Ok(Attached::Readopted)
        }
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
            let id = program
                .attach_with_options(
                    &iface.name,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(|e| err(format!("attaching TCX ingress: {e}")))?;
            let link = program.take_link(id).map_err(|e| err(e.to_string()))?;
            let fd_link = FdLink::try_from(link).map_err(|e| {
                err(format!(
                    "kernel attached without TCX ({e}); ztunnel needs kernel >= 6.6"
                ))
            })?;
            fd_link
                .pin(&path)
                .map_err(|e| err(format!("pinning link at {}: {e}", path.display())))?;
            Ok(Attached::New)
        }
        Err(e) => Err(err(format!("opening pinned link {}: {e}", path.display()))),
    }
}

/// The pin names present in `links_dir`.
pub fn pinned_links(links_dir: &Path) -> Result<Vec<String>, RedirectError> {
    let entries = std::fs::read_dir(links_dir).map_err(|source| RedirectError::PinDir {
        path: links_dir.to_path_buf(),
        source,
    })?;
    Ok(entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect())
}

/// Detaches a link by removing its pin (ztunnel holds no other reference).
pub fn detach(links_dir: &Path, pin_name: &str) -> Result<(), RedirectError> {
    let path: PathBuf = links_dir.join(pin_name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RedirectError::PinDir { path, source }),
    }
}
