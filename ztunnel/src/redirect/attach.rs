//! TCX links and the listener-lookup link, pinned so they outlive the
//! process.
//!
//! Each TC link is pinned as `<pin-dir>/links/<role>-<ifname>-<ifindex>`;
//! the ifindex in the name tells a recreated veth (a pod restarted under the
//! same name) from the one the old link was made for. The pins are the
//! source of truth for what is attached: a link without a pin is detached
//! once ztunnel drops its file descriptor. The netns's listener-lookup link
//! is pinned as `<pin-dir>/lookup`.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::programs::{
    links::{FdLink, LinkError, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    LinkOrder, SchedClassifier, SkLookup, TcAttachType,
};
use ztunnel_common::programs;

use super::{
    topology::{Interface, LinkLayer},
    RedirectError,
};

/// Which program a link runs, and so which hook it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// A pod's host-side veth, ingress: what the pod sends.
    Pod,
    /// A device traffic from elsewhere arrives on, ingress.
    Uplink,
    /// Egress of every pod veth and uplink: the fail-closed backstop.
    Guard,
    /// A port of a bridge pods sit behind, ingress: source checks.
    Port,
    /// Such a bridge device, ingress: capture for its pods.
    Bridge,
}

impl Role {
    fn prefix(self) -> &'static str {
        match self {
            Role::Pod => "pod",
            Role::Uplink => "uplink",
            Role::Guard => "guard",
            Role::Port => "port",
            Role::Bridge => "bridge",
        }
    }

    fn from_prefix(prefix: &str) -> Option<Self> {
        [
            Role::Pod,
            Role::Uplink,
            Role::Guard,
            Role::Port,
            Role::Bridge,
        ]
        .into_iter()
        .find(|r| r.prefix() == prefix)
    }

    fn hook(self) -> TcAttachType {
        match self {
            Role::Pod | Role::Uplink | Role::Port | Role::Bridge => TcAttachType::Ingress,
            Role::Guard => TcAttachType::Egress,
        }
    }

    /// The program for this role on a device whose packets start as `layer`
    /// says. `None`: capture cannot parse that device's packets.
    pub fn program(self, layer: LinkLayer) -> Option<&'static str> {
        match (self, layer) {
            (_, LinkLayer::Unsupported) => None,
            (Role::Pod, LinkLayer::Ethernet) => Some(programs::POD_INGRESS),
            // A pod's veth always has an Ethernet header.
            (Role::Pod, LinkLayer::L3) => None,
            (Role::Uplink, LinkLayer::Ethernet) => Some(programs::UPLINK_INGRESS),
            (Role::Uplink, LinkLayer::L3) => Some(programs::UPLINK_INGRESS_L3),
            (Role::Guard, LinkLayer::Ethernet) => Some(programs::GUARD_EGRESS),
            (Role::Guard, LinkLayer::L3) => Some(programs::GUARD_EGRESS_L3),
            (Role::Port, LinkLayer::Ethernet) => Some(programs::PORT_INGRESS),
            (Role::Bridge, LinkLayer::Ethernet) => Some(programs::BRIDGE_INGRESS),
            // Bridges and their ports carry Ethernet frames.
            (Role::Port | Role::Bridge, LinkLayer::L3) => None,
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

/// A pin name taken apart: role, interface name, ifindex.
pub fn parse_pin_name(name: &str) -> Option<(Role, &str, u32)> {
    let (prefix, rest) = name.split_once('-')?;
    let (ifname, index) = rest.rsplit_once('-')?;
    Some((Role::from_prefix(prefix)?, ifname, index.parse().ok()?))
}

/// Attaches `program` at `role`'s hook of `iface`, first in the TCX chain
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
            let fd_link = attach_first(program, role, iface)?;
            fd_link
                .pin(&path)
                .map_err(|e| err(format!("pinning link at {}: {e}", path.display())))?;
            Ok(Attached::New)
        }
        Err(e) => Err(err(format!("opening pinned link {}: {e}", path.display()))),
    }
}

/// The ids of the programs at `role`'s hook of `ifname`, in the order the
/// kernel runs them.
pub fn chain(ifname: &str, role: Role) -> Result<Vec<u32>, RedirectError> {
    let (_, programs) =
        SchedClassifier::query_tcx(ifname, role.hook()).map_err(|e| RedirectError::Attach {
            iface: ifname.to_string(),
            message: format!("querying TCX {:?}: {e}", role.hook()),
        })?;
    Ok(programs.iter().map(|p| p.id()).collect())
}

/// Puts `program` back in front of `role`'s hook of `iface`, where another
/// program (a CNI's, re-attached with "before all") has taken first place:
/// a new first link is made and pinned over the old link's pin, whose
/// link then goes. Until the swap both run our program, which is harmless.
pub fn move_to_front(
    program: &mut SchedClassifier,
    links_dir: &Path,
    role: Role,
    iface: &Interface,
) -> Result<(), RedirectError> {
    let err = |message: String| RedirectError::Attach {
        iface: iface.name.clone(),
        message,
    };
    let fd_link = attach_first(program, role, iface)?;
    // Not a pin name `parse_pin_name` accepts, so a crash here leaves
    // nothing a later ztunnel would take for a link of its own.
    let staged = links_dir.join("moving");
    let _ = std::fs::remove_file(&staged);
    fd_link
        .pin(&staged)
        .map_err(|e| err(format!("pinning at {}: {e}", staged.display())))?;
    let path = links_dir.join(pin_name(role, iface));
    std::fs::rename(&staged, &path).map_err(|source| RedirectError::PinDir { path, source })
}

/// A new TCX link running `program` first at `role`'s hook of `iface`,
/// owned by the caller (detached when dropped, unless pinned).
fn attach_first(
    program: &mut SchedClassifier,
    role: Role,
    iface: &Interface,
) -> Result<FdLink, RedirectError> {
    let err = |message: String| RedirectError::Attach {
        iface: iface.name.clone(),
        message,
    };
    let id = program
        .attach_with_options(
            &iface.name,
            role.hook(),
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )
        .map_err(|e| err(format!("attaching TCX {:?}: {e}", role.hook())))?;
    let link = program.take_link(id).map_err(|e| err(e.to_string()))?;
    FdLink::try_from(link).map_err(|e| {
        err(format!(
            "kernel attached without TCX ({e}); ztunnel needs kernel >= 6.6"
        ))
    })
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

/// Attaches the listener-lookup program to this process's network namespace
/// and pins the link at `pin`, replacing an earlier ztunnel's. The new link
/// is attached before the old pin goes, and both select the same sockets
/// from the same pinned map, so lookups never go without the program.
pub fn attach_lookup(program: &mut SkLookup, pin: &Path) -> Result<(), RedirectError> {
    let err = |message: String| RedirectError::Attach {
        iface: "network namespace (sk_lookup)".into(),
        message,
    };
    let netns =
        std::fs::File::open("/proc/self/ns/net").map_err(|source| RedirectError::PinDir {
            path: PathBuf::from("/proc/self/ns/net"),
            source,
        })?;
    let id = program.attach(netns).map_err(|e| err(e.to_string()))?;
    let link = FdLink::from(program.take_link(id).map_err(|e| err(e.to_string()))?);
    // bpffs refuses names with dots.
    let staged = pin.with_file_name("lookup-next");
    let _ = std::fs::remove_file(&staged);
    link.pin(&staged)
        .map_err(|e| err(format!("pinning at {}: {e}", staged.display())))?;
    // rename(2) over the old pin drops the old link in the same step.
    std::fs::rename(&staged, pin).map_err(|source| RedirectError::PinDir {
        path: pin.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip() {
        let iface = Interface {
            name: "vz-pod-a".into(),
            index: 42,
        };
        for role in [
            Role::Pod,
            Role::Uplink,
            Role::Guard,
            Role::Port,
            Role::Bridge,
        ] {
            let name = pin_name(role, &iface);
            assert_eq!(parse_pin_name(&name), Some((role, "vz-pod-a", 42)));
        }
        assert_eq!(parse_pin_name("lookup"), None);
        assert_eq!(parse_pin_name("other-eth0-1"), None);
        assert_eq!(parse_pin_name("pod-eth0-x"), None);
    }

    #[test]
    fn programs_by_role_and_layer() {
        assert_eq!(
            Role::Uplink.program(LinkLayer::L3),
            Some(programs::UPLINK_INGRESS_L3)
        );
        assert_eq!(
            Role::Guard.program(LinkLayer::Ethernet),
            Some(programs::GUARD_EGRESS)
        );
        assert_eq!(Role::Pod.program(LinkLayer::L3), None);
        assert_eq!(Role::Guard.program(LinkLayer::Unsupported), None);
    }
}
