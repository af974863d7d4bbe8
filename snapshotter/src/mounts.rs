//! The mounts handed to containerd, and the few mount syscalls the snapshotter makes.
//!
//! [`rootfs_mounts`] follows containerd's overlay snapshotter (`snapshots/overlay`):
//! - no lower layers: a bind mount of the snapshot's own `fs` directory
//!   (`rw` for active, `ro` for a view), because overlayfs needs a lower layer;
//! - a view of exactly one lower layer: a read-only bind mount of it;
//! - otherwise overlayfs, `lowerdir=` nearest layer first, plus `upperdir=`/`workdir=`
//!   for active snapshots; `index=off` when the kernel has the overlay index feature.
//!
//! A lazily mounted Stoker image is one lower layer (its mountpoint), whatever the
//! number of layers the image had.

use std::path::{Path, PathBuf};

use stoker_api::Mount;

use crate::SnapshotterError;
use crate::store::SnapshotKind;

/// The mounts for a snapshot whose own directories are `fs` and `work` and whose
/// lower layers are `lowers`, nearest first.
pub fn rootfs_mounts(
    kind: SnapshotKind,
    fs: &Path,
    work: &Path,
    lowers: &[PathBuf],
    index_off: bool,
) -> Vec<Mount> {
    if lowers.is_empty() {
        let access = if kind == SnapshotKind::View {
            "ro"
        } else {
            "rw"
        };
        return vec![bind_mount(fs, access)];
    }
    if kind != SnapshotKind::Active && lowers.len() == 1 {
        return vec![bind_mount(&lowers[0], "ro")];
    }
    let mut options = Vec::new();
    if index_off {
        options.push("index=off".to_string());
    }
    if kind == SnapshotKind::Active {
        options.push(format!("workdir={}", work.display()));
        options.push(format!("upperdir={}", fs.display()));
    }
    let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    options.push(format!("lowerdir={}", lowerdir.join(":")));
    vec![Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options,
    }]
}

fn bind_mount(source: &Path, access: &str) -> Mount {
    Mount {
        r#type: "bind".into(),
        source: source.display().to_string(),
        target: String::new(),
        options: vec![access.into(), "rbind".into()],
    }
}

/// Whether overlayfs must be told `index=off` (containerd does this whenever the
/// kernel knows the option, so that layers can be shared between overlays).
pub fn overlay_index_off() -> bool {
    Path::new("/sys/module/overlay/parameters/index").exists()
}

/// True when `path` is a mount point (listed in /proc/self/mountinfo). Works for dead
/// FUSE mounts too, where `stat` fails with "transport endpoint is not connected".
pub fn is_mountpoint(path: &Path) -> bool {
    let wanted = path.display().to_string();
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mountpoint| unescape_mountinfo(mountpoint) == wanted)
}

/// True when the filesystem mounted at `path` answers `statfs(2)`. A FUSE mount whose
/// server died fails it with `ENOTCONN`; `stat` is no test, since the kernel may answer
/// it from cached attributes without asking the (dead) server.
pub fn answers_statfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated string and `buf` points to writable
    // memory of the size statfs(2) fills; neither is kept after the call.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), buf.as_mut_ptr()) };
    rc == 0
}

/// Lazily unmounts `path` (`umount2(MNT_DETACH)`): it disappears from the namespace
/// now, and is released once the last user (e.g. a running overlay) lets go.
pub fn detach_mount(path: &Path) -> Result<(), SnapshotterError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        SnapshotterError::InvalidArgument(format!(
            "mount path {} contains a NUL byte",
            path.display()
        ))
    })?;
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call;
    // umount2 does not keep the pointer.
    let rc = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        return Err(SnapshotterError::io(
            format!("unmounting {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && let Ok(octal) = std::str::from_utf8(&bytes[i + 1..i + 4])
            && let Ok(value) = u8::from_str_radix(octal, 8)
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn follows_containerd_overlay_rules() {
        let (fs, work) = (p("/s/1/fs"), p("/s/1/work"));
        let m = rootfs_mounts(SnapshotKind::Active, &fs, &work, &[], true);
        assert_eq!(m[0].r#type, "bind");
        assert_eq!(m[0].source, "/s/1/fs");
        assert_eq!(m[0].options, vec!["rw", "rbind"]);

        let m = rootfs_mounts(SnapshotKind::View, &fs, &work, &[], true);
        assert_eq!(m[0].options, vec!["ro", "rbind"]);

        let m = rootfs_mounts(SnapshotKind::View, &fs, &work, &[p("/s/2/fs")], true);
        assert_eq!(
            (m[0].r#type.as_str(), m[0].source.as_str()),
            ("bind", "/s/2/fs")
        );
        assert_eq!(m[0].options, vec!["ro", "rbind"]);

        let lowers = [p("/s/3/fs"), p("/s/2/fs")];
        let m = rootfs_mounts(SnapshotKind::Active, &fs, &work, &lowers, true);
        assert_eq!(m[0].r#type, "overlay");
        assert_eq!(
            m[0].options,
            vec![
                "index=off",
                "workdir=/s/1/work",
                "upperdir=/s/1/fs",
                "lowerdir=/s/3/fs:/s/2/fs"
            ]
        );

        let m = rootfs_mounts(SnapshotKind::View, &fs, &work, &lowers, false);
        assert_eq!(m[0].options, vec!["lowerdir=/s/3/fs:/s/2/fs"]);
    }

    #[test]
    fn knows_the_root_is_a_mountpoint() {
        assert!(is_mountpoint(Path::new("/")));
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
    }
}
