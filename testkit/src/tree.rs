//! [`TreeSnapshot`]: a plain, comparable description of a whole filesystem tree.
//!
//! The same type is built from different sources and compared with [`TreeSnapshot::diff`]:
//! a real directory ([`TreeSnapshot::capture`], e.g. of a `umoci unpack` or a FUSE mount),
//! an image description ([`crate::image::ImageBuilder::expected_tree`]), or a Stoker index
//! (built field by field by the crate that reads the index).
//!
//! Conventions, which every builder of a snapshot must follow:
//! - keys are paths relative to the root, as raw bytes, without leading `/` or `./`;
//!   the root itself is not an entry;
//! - `mode` holds only permission and special bits (`0o7777`);
//! - `size` is the byte length for regular files, the target length for symlinks, and 0
//!   for everything else (directory sizes depend on the filesystem);
//! - `mtime` is whole seconds;
//! - `xattrs` leave out the names for which [`is_ignored_xattr`] is true;
//! - `hardlink_group` is `None` for an inode with one path in the tree, otherwise the
//!   smallest path (bytewise) of all the paths of that inode. Use
//!   [`TreeSnapshot::assign_hardlink_groups`] to compute it from inode numbers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::TestkitError;

/// Extended attributes that the host or `umoci` may add on their own, so they are not part
/// of an image's content: `security.selinux` (set by SELinux hosts), `trusted.*` (overlayfs
/// and other kernel users), and `user.overlay.*` (overlayfs in user namespaces).
pub const IGNORED_XATTR_PREFIXES: &[&[u8]] = &[b"security.selinux", b"trusted.", b"user.overlay."];

/// True for xattr names that snapshots leave out (see [`IGNORED_XATTR_PREFIXES`]).
pub fn is_ignored_xattr(name: &[u8]) -> bool {
    IGNORED_XATTR_PREFIXES
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

/// File type of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FileKind {
    Dir,
    File,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

/// Everything a snapshot records about one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntrySnapshot {
    pub kind: FileKind,
    /// Permission and special bits only (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Bytes for files, target length for symlinks, 0 otherwise.
    pub size: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// `(major, minor)` for char and block devices, `None` otherwise.
    pub rdev: Option<(u32, u32)>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Target of a symlink.
    pub symlink_target: Option<Vec<u8>>,
    /// sha256 of a regular file's content.
    pub sha256: Option<[u8; 32]>,
    /// Smallest path of this inode's hardlinks, when it has more than one path.
    pub hardlink_group: Option<Vec<u8>>,
}

/// A whole tree: relative path bytes → entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeSnapshot {
    pub entries: BTreeMap<Vec<u8>, EntrySnapshot>,
}

impl TreeSnapshot {
    /// Walks the directory `root` (not following symlinks) and records every entry under it.
    /// Regular files are read in full to hash them.
    pub fn capture(root: &Path) -> Result<TreeSnapshot, TestkitError> {
        let mut snapshot = TreeSnapshot::default();
        let mut inodes = BTreeMap::new();
        let mut pending = vec![Vec::<u8>::new()];
        while let Some(dir) = pending.pop() {
            let dir_path = root.join(std::ffi::OsStr::from_bytes(&dir));
            let read_dir = std::fs::read_dir(&dir_path)
                .map_err(|e| TestkitError::io(format!("listing {}", dir_path.display()), e))?;
            for item in read_dir {
                let item = item
                    .map_err(|e| TestkitError::io(format!("listing {}", dir_path.display()), e))?;
                let name = item.file_name();
                let relative = if dir.is_empty() {
                    name.as_bytes().to_vec()
                } else {
                    [dir.as_slice(), b"/", name.as_bytes()].concat()
                };
                let (entry, meta) = capture_entry(&item.path())?;
                if entry.kind == FileKind::Dir {
                    pending.push(relative.clone());
                } else if meta.nlink() > 1 {
                    // dev and ino together identify the inode.
                    inodes.insert(relative.clone(), (meta.dev(), meta.ino()));
                }
                snapshot.entries.insert(relative, entry);
            }
        }
        snapshot.assign_hardlink_groups(&inodes);
        Ok(snapshot)
    }

    /// Sets `hardlink_group` of every entry from `inode_of` (path → any inode identity):
    /// paths sharing an identity get the smallest of their paths, others get `None`.
    pub fn assign_hardlink_groups<I: Ord + Clone>(&mut self, inode_of: &BTreeMap<Vec<u8>, I>) {
        let mut smallest: BTreeMap<I, (&Vec<u8>, usize)> = BTreeMap::new();
        for (path, inode) in inode_of {
            // Paths iterate in order, so the first one seen is the smallest.
            smallest.entry(inode.clone()).or_insert((path, 0)).1 += 1;
        }
        for (path, entry) in self.entries.iter_mut() {
            entry.hardlink_group = inode_of
                .get(path)
                .and_then(|inode| smallest.get(inode))
                .filter(|(_, count)| *count > 1)
                .map(|(group, _)| (*group).clone());
        }
    }

    /// Human-readable differences, one line each, empty when the trees are equal.
    /// `self` is called "left" and `other` "right".
    pub fn diff(&self, other: &TreeSnapshot) -> Vec<String> {
        let mut differences = Vec::new();
        for (path, left) in &self.entries {
            match other.entries.get(path) {
                None => differences.push(format!(
                    "{}: only in left ({:?})",
                    display_path(path),
                    left.kind
                )),
                Some(right) => entry_differences(path, left, right, &mut differences),
            }
        }
        for (path, right) in &other.entries {
            if !self.entries.contains_key(path) {
                differences.push(format!(
                    "{}: only in right ({:?})",
                    display_path(path),
                    right.kind
                ));
            }
        }
        differences
    }

    /// Panics with a readable report (at most `max_lines` differences) unless the trees are
    /// equal. For tests.
    pub fn assert_same(&self, other: &TreeSnapshot, max_lines: usize) {
        let differences = self.diff(other);
        if !differences.is_empty() {
            let shown = differences.len().min(max_lines);
            panic!(
                "trees differ in {} ways; first {shown}:\n{}",
                differences.len(),
                differences[..shown].join("\n")
            );
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if the tree has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry at `path` (relative bytes).
    pub fn get(&self, path: impl AsRef<[u8]>) -> Option<&EntrySnapshot> {
        self.entries.get(path.as_ref())
    }
}

fn capture_entry(path: &Path) -> Result<(EntrySnapshot, std::fs::Metadata), TestkitError> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| TestkitError::io(format!("stat {}", path.display()), e))?;
    let file_type = meta.file_type();
    let kind = if file_type.is_dir() {
        FileKind::Dir
    } else if file_type.is_file() {
        FileKind::File
    } else if file_type.is_symlink() {
        FileKind::Symlink
    } else if file_type.is_char_device() {
        FileKind::CharDevice
    } else if file_type.is_block_device() {
        FileKind::BlockDevice
    } else if file_type.is_fifo() {
        FileKind::Fifo
    } else {
        FileKind::Socket
    };
    let symlink_target = match kind {
        FileKind::Symlink => Some(
            std::fs::read_link(path)
                .map_err(|e| TestkitError::io(format!("readlink {}", path.display()), e))?
                .as_os_str()
                .as_bytes()
                .to_vec(),
        ),
        _ => None,
    };
    let sha256 = match kind {
        FileKind::File => Some(hash_file(path)?),
        _ => None,
    };
    let size = match kind {
        FileKind::File | FileKind::Symlink => meta.size(),
        _ => 0,
    };
    let rdev = match kind {
        FileKind::CharDevice | FileKind::BlockDevice => {
            Some((dev_major(meta.rdev()), dev_minor(meta.rdev())))
        }
        _ => None,
    };
    let entry = EntrySnapshot {
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        size,
        mtime: meta.mtime(),
        rdev,
        xattrs: read_xattrs(path)?,
        symlink_target,
        sha256,
        hardlink_group: None,
    };
    Ok((entry, meta))
}

/// Major number of a Linux `dev_t` (glibc's `gnu_dev_major` encoding).
pub fn dev_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32
}

/// Minor number of a Linux `dev_t` (glibc's `gnu_dev_minor` encoding).
pub fn dev_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32
}

/// Linux's EOPNOTSUPP (= ENOTSUP).
const EOPNOTSUPP: i32 = 95;

fn read_xattrs(path: &Path) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, TestkitError> {
    let mut xattrs = BTreeMap::new();
    // The xattr crate uses the l*xattr calls: symlinks are not followed.
    let names = match xattr::list(path) {
        Ok(names) => names,
        // A filesystem without xattr support has none; a missing one shows up in `diff`.
        Err(e) if e.raw_os_error() == Some(EOPNOTSUPP) => return Ok(xattrs),
        Err(e) => return Err(TestkitError::io(format!("listxattr {}", path.display()), e)),
    };
    for name in names {
        if is_ignored_xattr(name.as_bytes()) {
            continue;
        }
        let value = xattr::get(path, &name)
            .map_err(|e| {
                TestkitError::io(
                    format!("getxattr {} {}", path.display(), name.to_string_lossy()),
                    e,
                )
            })?
            .unwrap_or_default();
        xattrs.insert(name.as_bytes().to_vec(), value);
    }
    Ok(xattrs)
}

fn hash_file(path: &Path) -> Result<[u8; 32], TestkitError> {
    let context = || format!("reading {}", path.display());
    let mut file = std::fs::File::open(path).map_err(|e| TestkitError::io(context(), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| TestkitError::io(context(), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

/// A path for messages: printable ASCII as is, other bytes escaped (`\xe9`).
pub fn display_path(path: &[u8]) -> String {
    path.escape_ascii().to_string()
}

fn entry_differences(
    path: &[u8],
    left: &EntrySnapshot,
    right: &EntrySnapshot,
    out: &mut Vec<String>,
) {
    let path = display_path(path);
    let mut line = |field: &str, l: String, r: String| {
        if l != r {
            out.push(format!("{path}: {field} differs: left {l}, right {r}"));
        }
    };
    line(
        "kind",
        format!("{:?}", left.kind),
        format!("{:?}", right.kind),
    );
    line(
        "mode",
        format!("{:o}", left.mode),
        format!("{:o}", right.mode),
    );
    line("uid", left.uid.to_string(), right.uid.to_string());
    line("gid", left.gid.to_string(), right.gid.to_string());
    line("size", left.size.to_string(), right.size.to_string());
    line("mtime", left.mtime.to_string(), right.mtime.to_string());
    line(
        "rdev",
        format!("{:?}", left.rdev),
        format!("{:?}", right.rdev),
    );
    line(
        "symlink target",
        optional_bytes(&left.symlink_target),
        optional_bytes(&right.symlink_target),
    );
    line(
        "sha256",
        left.sha256.map(hex::encode).unwrap_or_default(),
        right.sha256.map(hex::encode).unwrap_or_default(),
    );
    line(
        "hardlink group",
        optional_bytes(&left.hardlink_group),
        optional_bytes(&right.hardlink_group),
    );
    line(
        "xattrs",
        format_xattrs(&left.xattrs),
        format_xattrs(&right.xattrs),
    );
}

fn optional_bytes(value: &Option<Vec<u8>>) -> String {
    match value {
        Some(bytes) => format!("\"{}\"", bytes.escape_ascii()),
        None => "none".into(),
    }
}

fn format_xattrs(xattrs: &BTreeMap<Vec<u8>, Vec<u8>>) -> String {
    let mut text = String::from("{");
    for (i, (name, value)) in xattrs.iter().enumerate() {
        let separator = if i == 0 { "" } else { ", " };
        let _ = write!(
            text,
            "{separator}{}=\"{}\"",
            name.escape_ascii(),
            value.escape_ascii()
        );
    }
    text.push('}');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_decode_like_glibc() {
        // makedev(259, 70000) with glibc's encoding.
        let (major, minor) = (259u64, 70000u64);
        let dev = ((major & 0xfffff000) << 32)
            | ((major & 0xfff) << 8)
            | ((minor & 0xffffff00) << 12)
            | (minor & 0xff);
        assert_eq!((dev_major(dev), dev_minor(dev)), (259, 70000));
    }

    #[test]
    fn hardlink_groups_use_the_smallest_path() {
        let entry = EntrySnapshot {
            kind: FileKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            rdev: None,
            xattrs: BTreeMap::new(),
            symlink_target: None,
            sha256: None,
            hardlink_group: None,
        };
        let mut tree = TreeSnapshot::default();
        for path in ["b", "a", "c", "d"] {
            tree.entries.insert(path.as_bytes().to_vec(), entry.clone());
        }
        let inodes: BTreeMap<Vec<u8>, u64> = [("b", 1), ("a", 2), ("c", 1), ("d", 3)]
            .into_iter()
            .map(|(p, i)| (p.as_bytes().to_vec(), i))
            .collect();
        tree.assign_hardlink_groups(&inodes);
        assert_eq!(
            tree.get("b").and_then(|e| e.hardlink_group.clone()),
            Some(b"b".to_vec())
        );
        assert_eq!(
            tree.get("c").and_then(|e| e.hardlink_group.clone()),
            Some(b"b".to_vec())
        );
        assert_eq!(tree.get("a").and_then(|e| e.hardlink_group.clone()), None);

        let mut other = tree.clone();
        other.entries.remove(b"d".as_slice());
        if let Some(e) = other.entries.get_mut(b"a".as_slice()) {
            e.mode = 0o600;
        }
        let diff = tree.diff(&other);
        assert_eq!(diff.len(), 2, "{diff:?}");
        assert!(diff[0].starts_with("a: mode differs"));
        assert!(diff[1].starts_with("d: only in left"));
    }
}
