//! Conversions between the index's view of an inode and FUSE's: inode numbers,
//! file types, `stat` attributes and device numbers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};
use stoker_format::{FileKind, Inode, InodeId};

/// Block size reported by `stat` and `statfs`.
pub(crate) const BLOCK_SIZE: u32 = 4096;

/// The FUSE inode number of index inode `id`: the root (0) becomes FUSE's root (1).
/// Stable for the life of the index, so hardlinks share a number.
pub(crate) fn ino_of(id: InodeId) -> INodeNo {
    INodeNo(u64::from(id) + 1)
}

/// The index inode behind FUSE inode number `ino`, if it can name one.
pub(crate) fn id_of(ino: INodeNo) -> Option<InodeId> {
    ino.0
        .checked_sub(1)
        .and_then(|id| InodeId::try_from(id).ok())
}

pub(crate) fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Dir => FileType::Directory,
        FileKind::File => FileType::RegularFile,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

/// The kernel's 32-bit device number encoding (`new_encode_dev`), which is what
/// `fuse_attr.rdev` carries.
pub(crate) fn encode_rdev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn time_of(sec: i64, nsec: u32) -> SystemTime {
    let nsec = Duration::from_nanos(u64::from(nsec.min(999_999_999)));
    if sec >= 0 {
        UNIX_EPOCH + Duration::from_secs(sec.unsigned_abs()) + nsec
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + nsec
    }
}

/// The `stat` attributes of an inode. The index stores one time (mtime); atime and
/// ctime report it too, since the image never changes.
pub(crate) fn file_attr(inode: &Inode) -> FileAttr {
    let time = time_of(inode.mtime_sec, inode.mtime_nsec);
    let size = match inode.kind {
        FileKind::File | FileKind::Symlink => inode.size,
        _ => 0,
    };
    let rdev = match inode.kind {
        FileKind::CharDevice | FileKind::BlockDevice => {
            encode_rdev(inode.rdev_major, inode.rdev_minor)
        }
        _ => 0,
    };
    FileAttr {
        ino: ino_of(inode.id),
        size,
        blocks: size.div_ceil(512),
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind: file_type(inode.kind),
        // Permission and special bits; the type bits come from `kind`.
        perm: (inode.mode & 0o7777) as u16,
        nlink: inode.nlink,
        uid: inode.uid,
        gid: inode.gid,
        rdev,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

/// `access(2)` semantics for callers when the kernel does not check permissions
/// itself (mounts without `default_permissions`). Only the caller's primary group
/// is known here, so supplementary groups are not considered.
pub(crate) fn may_access(inode: &Inode, uid: u32, gid: u32, mask: i32) -> bool {
    let want = (mask & (libc::R_OK | libc::W_OK | libc::X_OK)) as u32;
    if uid == 0 {
        // Root may read and write anything; execute needs some execute bit (or a directory).
        return want & libc::X_OK as u32 == 0
            || inode.kind == FileKind::Dir
            || inode.mode & 0o111 != 0;
    }
    let bits = if uid == inode.uid {
        (inode.mode >> 6) & 7
    } else if gid == inode.gid {
        (inode.mode >> 3) & 7
    } else {
        inode.mode & 7
    };
    bits & want == want
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inode(kind: FileKind, mode: u32) -> Inode {
        Inode {
            id: 4,
            kind,
            mode,
            uid: 1000,
            gid: 100,
            nlink: 2,
            mtime_sec: -5,
            mtime_nsec: 7,
            rdev_major: 0,
            rdev_minor: 0,
            size: 1234,
            parent: 0,
        }
    }

    #[test]
    fn inode_numbers_round_trip_and_reject_zero() {
        assert_eq!(ino_of(0), INodeNo::ROOT);
        assert_eq!(id_of(ino_of(41)), Some(41));
        assert_eq!(id_of(INodeNo(0)), None);
        assert_eq!(id_of(INodeNo(u64::MAX)), None);
    }

    #[test]
    fn device_numbers_use_the_kernel_encoding() {
        // Same as glibc's makedev() truncated to 32 bits for these ranges.
        for (major, minor) in [(1, 3), (8, 0), (259, 65537), (4095, 0xfffff)] {
            let glibc = libc::makedev(major, minor) as u32;
            assert_eq!(encode_rdev(major, minor), glibc, "{major}:{minor}");
        }
    }

    #[test]
    fn attributes_come_from_the_index() {
        let attr = file_attr(&inode(FileKind::File, 0o104755));
        assert_eq!(attr.perm, 0o4755);
        assert_eq!(attr.kind, FileType::RegularFile);
        assert_eq!((attr.uid, attr.gid, attr.nlink), (1000, 100, 2));
        assert_eq!(attr.ino, INodeNo(5));
        assert_eq!(attr.blocks, 3);
        let before_epoch = UNIX_EPOCH - Duration::from_secs(5) + Duration::from_nanos(7);
        assert_eq!(attr.mtime, before_epoch);
        assert_eq!(file_attr(&inode(FileKind::Dir, 0o40755)).size, 0);
    }

    #[test]
    fn access_follows_owner_group_other_bits() {
        let file = inode(FileKind::File, 0o100640);
        assert!(may_access(&file, 1000, 1, libc::R_OK | libc::W_OK));
        assert!(may_access(&file, 2000, 100, libc::R_OK));
        assert!(!may_access(&file, 2000, 100, libc::W_OK));
        assert!(!may_access(&file, 2000, 200, libc::R_OK));
        assert!(may_access(&file, 0, 0, libc::R_OK | libc::W_OK));
        assert!(!may_access(&file, 0, 0, libc::X_OK));
        assert!(may_access(
            &inode(FileKind::File, 0o100001),
            0,
            0,
            libc::X_OK
        ));
    }
}
