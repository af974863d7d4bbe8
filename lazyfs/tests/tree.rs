//! A mount shows exactly what the index says: every path, attribute, xattr, link
//! target and byte, for every kind of file, read through the kernel with std::fs.

mod common;

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use common::*;
use stoker_format::{NodeKind, Tree};
use stoker_lazyfs::MountOptions;
use stoker_testkit::tree::TreeSnapshot;

const SMALL_FILES: usize = 10_000;

/// Every kind of node, odd names and attributes, 10,000 small files.
fn every_kind_image() -> TestImage {
    let mut b = ImageBuilder::new();
    let root = Tree::ROOT;
    let etc = b.dir(root, b"etc", meta(0o755, 0, 0));
    let bin = b.dir(root, b"bin", meta(0o755, 0, 0));
    let secret = b.dir(root, b"secret", meta(0o700, 1000, 1000));
    let deep = b.dir(secret, b"deeper", meta(0o751, 1000, 1000));

    b.file(etc, b"hostname", b"stoker\n", 1 << 20, meta(0o644, 0, 0));
    b.file(etc, b"empty", b"", 1 << 20, meta(0o600, 0, 0));
    let mut setuid = meta(0o4755, 0, 0);
    setuid.mtime_sec = 86_400;
    setuid.mtime_nsec = 0;
    // A valid VFS_CAP_REVISION_2 value (the kernel parses it): effective, cap_net_raw.
    let capability = [
        [0x01, 0, 0, 0x02],
        0x2000u32.to_le_bytes(),
        [0; 4],
        [0; 4],
        [0; 4],
    ]
    .concat();
    setuid
        .xattrs
        .insert(b"security.capability".to_vec(), capability);
    setuid
        .xattrs
        .insert(b"user.comment".to_vec(), b"a value".to_vec());
    b.file(bin, b"ping", &pattern(1, 3000), 1 << 20, setuid);

    // Multi-chunk: 64 KiB chunks and a short tail.
    let big = pattern(2, 5 * 65536 + 1234);
    b.file(bin, b"big", &big, 65536, meta(0o755, 0, 0));
    // Holes at the start, between pieces and at the end.
    b.sparse_file(
        root,
        b"sparse",
        3 << 20,
        &[(100_000, pattern(3, 5000)), (1 << 20, pattern(4, 70_000))],
        meta(0o644, 0, 0),
    );
    // A hardlink pair, with different names in different directories.
    let shared = b.file(etc, b"shared", &pattern(5, 10_000), 4096, meta(0o640, 7, 8));
    b.tree.link(bin, b"shared-link", shared);

    b.add(
        root,
        b"link-to-hostname",
        NodeKind::Symlink(b"etc/hostname".to_vec()),
        meta(0o777, 0, 0),
    );
    b.add(
        root,
        b"dangling",
        NodeKind::Symlink(b"/nowhere/\xffbytes".to_vec()),
        meta(0o777, 0, 0),
    );
    b.add(
        etc,
        b"null",
        NodeKind::CharDevice { major: 1, minor: 3 },
        meta(0o666, 0, 0),
    );
    b.add(
        etc,
        b"disk",
        NodeKind::BlockDevice {
            major: 259,
            minor: 70_000,
        },
        meta(0o660, 0, 6),
    );
    b.add(etc, b"fifo", NodeKind::Fifo, meta(0o620, 0, 0));
    b.add(etc, b"socket", NodeKind::Socket, meta(0o755, 0, 0));
    b.add(
        deep,
        b"\xff\xfe-not-utf8 name",
        NodeKind::Fifo,
        meta(0o644, 1, 2),
    );
    let mut xdir = meta(0o1777, 0, 0);
    xdir.xattrs
        .insert(b"trusted.overlay.opaque".to_vec(), b"y".to_vec());
    xdir.xattrs.insert(b"user.big".to_vec(), vec![7u8; 3000]);
    b.dir(root, b"tmp", xdir);

    let many = b.dir(root, b"many", meta(0o755, 0, 0));
    for i in 0..SMALL_FILES {
        let name = format!("file-{i:05}.txt");
        b.file(
            many,
            name.as_bytes(),
            format!("small file number {i}\n").as_bytes(),
            1 << 20,
            meta(0o644, (i % 3) as u32, 0),
        );
    }
    b.finish()
}

#[test]
fn the_mount_shows_every_path_attribute_xattr_link_and_byte_of_the_index() {
    if !fuse_available("the_mount_shows_every_path_attribute_xattr_link_and_byte_of_the_index") {
        return;
    }
    let image = every_kind_image();
    let mounted = mount_image(&image, 1 << 30, MountOptions::default(), |_| {});
    let root = mounted.mountpoint.path();

    let expected = snapshot_of_index(&image.index, &|d| image.chunk_bytes[d].clone());
    assert_eq!(expected.len(), 20 + SMALL_FILES);
    let seen = TreeSnapshot::capture(root).expect("walk the mount");
    expected.assert_same(&seen, 30);

    // What the snapshot does not cover: nlink, inode numbers, times to the
    // nanosecond, device numbers as stat shows them.
    let stat = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap();
    assert_eq!(stat("etc").nlink(), 2);
    assert_eq!(stat("secret").nlink(), 3);
    let root_meta = std::fs::metadata(root).unwrap();
    assert_eq!(root_meta.nlink(), 2 + 5, "root has five subdirectories");
    assert_eq!(root_meta.ino(), 1);
    let shared = stat("etc/shared");
    assert_eq!(shared.nlink(), 2);
    assert_eq!(shared.ino(), stat("bin/shared-link").ino());
    assert_eq!(
        (
            stat("etc/hostname").mtime(),
            stat("etc/hostname").mtime_nsec()
        ),
        (1_700_000_000, 123_456_789)
    );
    assert_eq!(stat("etc/hostname").atime(), 1_700_000_000);
    assert_eq!(stat("bin/ping").mtime(), 86_400);
    let null = stat("etc/null");
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    assert_eq!(stat("etc/disk").rdev(), libc::makedev(259, 70_000));
    // Inode numbers are stable: the same path gives the same number each time.
    let again = std::fs::symlink_metadata(root.join("many/file-00042.txt")).unwrap();
    assert_eq!(again.ino(), stat("many/file-00042.txt").ino());
    assert_eq!(
        u64::from(image.index.resolve(b"many/file-00042.txt").unwrap()) + 1,
        again.ino()
    );

    // Directory listings include every entry once, non-UTF-8 names intact.
    let listed: Vec<Vec<u8>> = std::fs::read_dir(root.join("secret/deeper"))
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    assert_eq!(listed, vec![b"\xff\xfe-not-utf8 name".to_vec()]);
    assert_eq!(
        std::fs::read_dir(root.join("many")).unwrap().count(),
        SMALL_FILES
    );

    // Missing names: ENOENT, again and again (the second answer may be cached).
    for _ in 0..2 {
        let err = std::fs::symlink_metadata(root.join("etc/missing")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    }
    let err = std::fs::symlink_metadata(root.join("etc/hostname/below")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));

    // xattrs: exact values, ENODATA for a missing one, ERANGE for a short buffer.
    let ping = root.join("bin/ping");
    let mut names: Vec<_> = xattr::list(&ping).unwrap().collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            OsStr::new("security.capability"),
            OsStr::new("user.comment")
        ]
    );
    assert_eq!(xattr::get(&ping, "user.missing").unwrap(), None);
    let tmp = root.join("tmp");
    assert_eq!(xattr::get(&tmp, "user.big").unwrap(), Some(vec![7u8; 3000]));
    let mut small = [0u8; 10];
    let name = std::ffi::CString::new("user.big").unwrap();
    let path = std::ffi::CString::new(tmp.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C strings and a buffer of the stated length.
    let rc = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            small.as_mut_ptr().cast(),
            small.len(),
        )
    };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ERANGE)
    );

    // Reads at every kind of offset: across chunk boundaries, in holes, past the end.
    let big = image.content(b"bin/big");
    let file = std::fs::File::open(root.join("bin/big")).unwrap();
    for (offset, len) in [
        (0, 10),
        (65530, 20),
        (65536 * 5 + 1000, 5000),
        (big.len() as u64, 10),
        (big.len() as u64 + 100, 10),
    ] {
        let mut buf = vec![0xAAu8; len];
        let n = std::os::unix::fs::FileExt::read_at(&file, &mut buf, offset).unwrap();
        let start = (offset as usize).min(big.len());
        let end = (offset as usize + len).min(big.len());
        assert_eq!(&buf[..n], &big[start..end], "read {len} at {offset}");
    }
    let sparse = image.content(b"sparse");
    let mut read_back = Vec::new();
    std::fs::File::open(root.join("sparse"))
        .unwrap()
        .read_to_end(&mut read_back)
        .unwrap();
    assert_eq!(read_back.len(), 3 << 20);
    assert!(read_back == sparse, "sparse file differs");
    assert!(read_back[..100_000].iter().all(|b| *b == 0));

    // statfs: a read-only file system with the image's inode count.
    let stats = nix_statvfs(root);
    assert_eq!(stats.0, u64::from(image.index.inode_count()));
    assert!(stats.1 & libc::ST_RDONLY != 0);

    let counters = mounted.handle.counters();
    assert!(counters.reads > 0 && counters.lookups > 0, "{counters:?}");
    assert_eq!(counters.read_errors, 0);
}

/// (files, flags) from statvfs.
fn nix_statvfs(path: &std::path::Path) -> (u64, u64) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: an all-zero statvfs is a valid value to overwrite.
    let mut out: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and output pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut out) };
    assert_eq!(rc, 0);
    (out.f_files, out.f_flag)
}

#[test]
fn snapshot_of_index_matches_the_builders_contents() {
    // The helper itself must agree with the bytes the builder started from.
    let image = every_kind_image();
    let snapshot = snapshot_of_index(&image.index, &|d| image.chunk_bytes[d].clone());
    let ping = snapshot.get("bin/ping").unwrap();
    use sha2::Digest as _;
    let want: [u8; 32] = sha2::Sha256::digest(pattern(1, 3000)).into();
    assert_eq!(ping.sha256, Some(want));
    assert_eq!(ping.mode, 0o4755);
    assert_eq!(
        snapshot.get("etc/shared").unwrap().hardlink_group,
        Some(b"bin/shared-link".to_vec())
    );
}
