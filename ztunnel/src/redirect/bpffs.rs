//! The BPF filesystem that holds ztunnel's pins.
//!
//! bpffs is not always mounted at `/sys/fs/bpf` (it was not on a fresh
//! machine, and `ip netns exec` hides it behind a fresh sysfs), so ztunnel
//! mounts it when the pin directory's filesystem is not bpffs.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use super::RedirectError;

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes sure `pin_dir` exists on a bpffs, mounting bpffs at `/sys/fs/bpf`
/// when the pin directory lives beneath it and nothing is mounted there.
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<(), RedirectError> {
    let bpffs_root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(bpffs_root) && !is_bpffs(bpffs_root) {
        mount_bpffs(bpffs_root)?;
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| RedirectError::PinDir {
        path: pin_dir.to_path_buf(),
        source,
    })?;
    if !is_bpffs(pin_dir) {
        return Err(RedirectError::NotBpffs(pin_dir.to_path_buf()));
    }
    Ok(())
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
