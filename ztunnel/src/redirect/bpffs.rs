//! The BPF filesystem that holds ztunnel's pins, and the check that it will
//! outlive the process.
//!
//! Capture fails closed after ztunnel exits only because its links and maps
//! stay pinned. A bpffs lives as long as some mount of it does: one that
//! ztunnel mounts inside a private mount namespace (`ip netns exec` remounts
//! `/sys` in one; so does a container without the host's `/sys/fs/bpf`)
//! dies with the process, the programs detach, and enrolled pods' traffic
//! flows in clear. So ztunnel mounts bpffs itself only in the host's mount
//! namespace, and refuses to pin on a bpffs the host cannot see.

use std::{
    ffi::CString,
    io,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
};

use super::RedirectError;

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// The inode of the initial PID namespace (`PROC_PID_INIT_INO`): a process
/// in it sees the host's init as PID 1.
const PROC_PID_INIT_INO: u64 = 0xefff_fffc;

/// Makes sure `pin_dir` exists on a bpffs that outlives this process,
/// mounting bpffs at `/sys/fs/bpf` when the pin directory lives beneath it,
/// nothing is mounted there, and the mount would be the host's.
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<(), RedirectError> {
    let bpffs_root = Path::new("/sys/fs/bpf");
    let host = HostView::read();
    if pin_dir.starts_with(bpffs_root) && !is_bpffs(bpffs_root) {
        match &host {
            HostView::Init { same_mounts: true, .. } => mount_bpffs(bpffs_root)?,
            HostView::Init { .. } => {
                return Err(private(
                    bpffs_root,
                    "no bpffs is mounted there, and one mounted now would belong to this process's private mount namespace",
                ))
            }
            HostView::Container => {
                return Err(private(
                    bpffs_root,
                    "no bpffs is mounted there, and this process is not in the host's PID and mount namespaces (a container?): mount the host's /sys/fs/bpf into it",
                ))
            }
            HostView::Unknown(why) => {
                return Err(private(
                    bpffs_root,
                    &format!("no bpffs is mounted there, and whether one mounted now would outlive this process is unknown ({why})"),
                ))
            }
        }
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| RedirectError::PinDir {
        path: pin_dir.to_path_buf(),
        source,
    })?;
    if !is_bpffs(pin_dir) {
        return Err(RedirectError::NotBpffs(pin_dir.to_path_buf()));
    }
    match host {
        HostView::Init { host_bpffs, .. } => {
            let dev = std::fs::metadata(pin_dir)
                .map_err(|source| RedirectError::PinDir {
                    path: pin_dir.to_path_buf(),
                    source,
                })?
                .dev();
            let (major, minor) = (libc::major(dev), libc::minor(dev));
            if !host_bpffs.contains(&(major, minor)) {
                return Err(private(
                    pin_dir,
                    &format!("its bpffs (device {major}:{minor}) is mounted only in this process's private mount namespace"),
                ));
            }
        }
        HostView::Container => tracing::info!(
            pin_dir = %pin_dir.display(),
            "pinning on the bpffs mounted here; from inside a container ztunnel cannot check it is the host's"
        ),
        HostView::Unknown(why) => tracing::warn!(
            pin_dir = %pin_dir.display(),
            reason = %why,
            "cannot check that the bpffs holding the pins outlives ztunnel"
        ),
    }
    Ok(())
}

fn private(path: &Path, why: &str) -> RedirectError {
    RedirectError::PrivatePins {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// What this process can tell about the host's mounts.
enum HostView {
    /// In the initial PID namespace: PID 1 is the host's init, whose mounts
    /// are the host's.
    Init {
        /// Whether this process shares init's mount namespace.
        same_mounts: bool,
        /// `major:minor` of every bpffs mounted in init's namespace.
        host_bpffs: Vec<(u32, u32)>,
    },
    /// In a PID namespace of its own: the host is out of sight.
    Container,
    /// Something could not be read.
    Unknown(String),
}

impl HostView {
    fn read() -> Self {
        let pid_ns = match std::fs::metadata("/proc/self/ns/pid") {
            Ok(m) => m.ino(),
            Err(e) => return HostView::Unknown(format!("/proc/self/ns/pid: {e}")),
        };
        if pid_ns != PROC_PID_INIT_INO {
            return HostView::Container;
        }
        let (ours, init) = match (
            std::fs::read_to_string("/proc/self/mountinfo"),
            std::fs::read_to_string("/proc/1/mountinfo"),
        ) {
            (Ok(ours), Ok(init)) => (ours, init),
            (Err(e), _) => return HostView::Unknown(format!("/proc/self/mountinfo: {e}")),
            (_, Err(e)) => return HostView::Unknown(format!("/proc/1/mountinfo: {e}")),
        };
        HostView::Init {
            // Mount IDs are unique across namespaces: the same root mount
            // means the same namespace.
            same_mounts: root_mount_id(&ours).is_some()
                && root_mount_id(&ours) == root_mount_id(&init),
            host_bpffs: bpffs_devices(&init),
        }
    }
}

/// The mount ID of `/` in a mountinfo text.
fn root_mount_id(mountinfo: &str) -> Option<&str> {
    mountinfo.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(4) == Some(&"/")).then(|| fields[0])
    })
}

/// `major:minor` of every bpffs in a mountinfo text (fields: id, parent,
/// major:minor, root, mount point, options..., "-", fstype, source, ...).
fn bpffs_devices(mountinfo: &str) -> Vec<(u32, u32)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            if fields.get(dash + 1) != Some(&"bpf") {
                return None;
            }
            let (major, minor) = fields.get(2)?.split_once(':')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
        .collect()
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == BPF_FS_MAGIC
    }
}

fn mount_bpffs(target: &Path) -> Result<(), RedirectError> {
    let err = |source: io::Error| RedirectError::MountBpffs {
        path: target.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(target).map_err(err)?;
    let c_target = CString::new(target.as_os_str().as_bytes())
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: all pointers are valid NUL-terminated strings or null data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c_target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    tracing::info!(path = %target.display(), "mounted bpffs");
    Ok(())
}

/// Where the maps of one ztunnel instance are pinned.
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("maps")
}

/// Where the TCX links of one ztunnel instance are pinned.
pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// Where the listener-lookup link of one ztunnel instance is pinned.
pub fn lookup_pin(pin_dir: &Path) -> PathBuf {
    pin_dir.join("lookup")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
42 23 0:39 / /sys/fs/bpf rw,relatime shared:5 - bpf bpf rw
50 27 0:51 / /run/other rw - bpf none rw,mode=700
";

    #[test]
    fn reads_bpffs_devices_and_the_root_mount() {
        assert_eq!(bpffs_devices(MOUNTINFO), [(0, 39), (0, 51)]);
        assert_eq!(root_mount_id(MOUNTINFO), Some("27"));
        assert_eq!(root_mount_id("garbage\n"), None);
    }
}
