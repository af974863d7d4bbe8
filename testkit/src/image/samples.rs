//! Ready-made test images: the standard image covering every layer case, image versions
//! for dedup tests, malicious layers, and a two-platform image.
//!
//! Sizes are parameters so fast unit tests can use small versions of the same images.

use super::entry::{Entry, Generator, file_capability};
use super::layout::{Compression, ImageBuilder, Layer, LayerContent, Platform};
use super::tar_writer::layer_tar;

/// Sizes of the large parts of [`standard_test_image_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandardImageSizes {
    /// Size of `data/sparse.bin` (mostly zeros).
    pub sparse_file: u64,
    /// Size of `data/random.bin` (seeded random bytes).
    pub random_file: u64,
    /// Number of small files under `many/`.
    pub small_files: usize,
}

impl StandardImageSizes {
    /// The sizes the format issue asks for: 100 MB sparse, 50 MB random, 10,000 small files.
    pub const FULL: StandardImageSizes = StandardImageSizes {
        sparse_file: 100 * 1000 * 1000,
        random_file: 50 * 1000 * 1000,
        small_files: 10_000,
    };

    /// Small enough for fast tests, still several 1 MiB chunks per large file.
    pub const SMALL: StandardImageSizes = StandardImageSizes {
        sparse_file: 4 * 1024 * 1024 + 123,
        random_file: 3 * 1024 * 1024 + 7,
        small_files: 200,
    };
}

/// Paths of interest in the standard image, for tests that look at one case.
pub mod paths {
    pub const SPARSE_FILE: &str = "data/sparse.bin";
    pub const RANDOM_FILE: &str = "data/random.bin";
    /// A file whose name is not UTF-8 (`caf\xe9.txt`, Latin-1).
    pub const NON_UTF8_FILE: &[u8] = b"data/caf\xe9.txt";
    /// Hardlinked in layer 1 by `etc/hello.hardlink` and in layer 2 by `etc/hello.hardlink2`.
    pub const HARDLINKED_FILE: &str = "etc/hello.txt";
    /// Has `security.capability` (CAP_NET_BIND_SERVICE) and mode 04755.
    pub const CAPABILITY_FILE: &str = "bin/server";
    pub const SMALL_FILES_DIR: &str = "many";
}

/// The standard test image at full size ([`StandardImageSizes::FULL`]).
pub fn standard_test_image() -> ImageBuilder {
    standard_test_image_with(StandardImageSizes::FULL)
}

/// Two layers (gzip, then zstd) covering every case the format must handle: every file
/// type, modes with setuid/setgid/sticky bits, owners, mtimes, xattrs including
/// `security.capability`, hardlinks within a layer and across layers, a whiteout of a file
/// and of a directory, an opaque directory, a file replaced by a directory and the
/// reverse, a non-UTF-8 name, paths and link targets over 100 bytes (PAX), a sparse file,
/// a random file and many small files.
pub fn standard_test_image_with(sizes: StandardImageSizes) -> ImageBuilder {
    let long_dir = format!("deep/{}", "d".repeat(90));
    let long_file = format!("{long_dir}/{}", "f".repeat(60));

    let mut lower = vec![
        Entry::dir("bin"),
        Entry::file(paths::CAPABILITY_FILE, "#!/bin/sh\necho server\n")
            .mode(0o4755)
            .xattr("security.capability", file_capability(10)),
        Entry::file("bin/tool", "#!/bin/sh\necho tool\n")
            .mode(0o2755)
            .owner(0, 50),
        Entry::dir("etc").mtime(1_690_000_000),
        Entry::file(paths::HARDLINKED_FILE, "hello world\n")
            .owner(1000, 1000)
            .mtime(1_600_000_000)
            .xattr("user.comment", "greeting")
            .xattr("user.binary", vec![0u8, 1, 2, 0xff]),
        Entry::hardlink("etc/hello.hardlink", paths::HARDLINKED_FILE),
        Entry::symlink("etc/hello.link", "hello.txt"),
        Entry::symlink("etc/absolute.link", "/etc/hello.txt"),
        Entry::symlink("etc/dangling.link", "does/not/exist"),
        Entry::symlink("etc/long.link", "t/".repeat(80)),
        Entry::file("etc/remove_me.txt", "to be whited out\n"),
        Entry::file("etc/motd", "old motd\n"),
        Entry::file("etc/secret", "root only\n").mode(0o600),
        Entry::dir("dev"),
        Entry::char_device("dev/null", 1, 3),
        Entry::block_device("dev/loop0", 7, 0).owner(0, 6),
        Entry::char_device("dev/big_numbers", 300, 70_000),
        Entry::fifo("dev/fifo"),
        Entry::dir("tmp").mode(0o1777),
        Entry::dir("shared").mode(0o2775).owner(0, 100),
        Entry::dir("gone_dir"),
        Entry::file("gone_dir/a", "a"),
        Entry::dir("gone_dir/sub"),
        Entry::file("gone_dir/sub/b", "b"),
        Entry::dir("opaque_dir").xattr("user.dir", "lower"),
        Entry::file("opaque_dir/old1", "old1"),
        Entry::dir("opaque_dir/old_sub"),
        Entry::file("opaque_dir/old_sub/old2", "old2"),
        Entry::file("file_to_dir", "I become a directory"),
        Entry::dir("dir_to_file"),
        Entry::file("dir_to_file/child", "I disappear with my parent"),
        Entry::dir("usr"),
        Entry::dir("usr/lib"),
        Entry::symlink("usr/lib64", "lib"),
        Entry::file(
            "usr/lib/libfoo.so.1",
            vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0],
        )
        .mode(0o755),
        Entry::dir("deep"),
        Entry::dir(&long_dir),
        Entry::file(&long_file, "long path\n"),
        Entry::dir("data").xattr("user.dir", "data"),
        Entry::file("data/empty", ""),
        Entry::file(paths::NON_UTF8_FILE, "non-UTF-8 name\n"),
        Entry::generated_file(paths::SPARSE_FILE, Generator::sparse(sizes.sparse_file, 1)),
        Entry::generated_file(paths::RANDOM_FILE, Generator::random(sizes.random_file, 2))
            .owner(1000, 1000)
            .mode(0o640),
        Entry::dir(paths::SMALL_FILES_DIR),
    ];
    let per_dir = 100;
    for i in 0..sizes.small_files {
        if i % per_dir == 0 {
            lower.push(Entry::dir(format!("many/d{:03}", i / per_dir)));
        }
        // Sizes from 0 to ~2 KiB, with distinct contents.
        let content = format!("small file {i}\n").repeat(i % 150);
        lower.push(Entry::file(
            format!("many/d{:03}/f{i:05}", i / per_dir),
            content,
        ));
    }

    let upper = vec![
        // Parents of changed paths are repeated, as `docker build` does.
        Entry::dir("etc").mtime(1_700_000_100),
        Entry::whiteout("etc/remove_me.txt"),
        Entry::file("etc/motd", "new motd\n").mode(0o640),
        Entry::hardlink("etc/hello.hardlink2", paths::HARDLINKED_FILE),
        Entry::whiteout("gone_dir"),
        Entry::opaque("opaque_dir"),
        Entry::dir("opaque_dir").xattr("user.dir", "upper"),
        Entry::file("opaque_dir/new1", "new1"),
        Entry::dir("file_to_dir"),
        Entry::file("file_to_dir/inside", "inside the new directory"),
        Entry::file("dir_to_file", "I was a directory"),
        Entry::dir("bin"),
        Entry::file("bin/ping", "#!/bin/sh\necho ping\n")
            .mode(0o755)
            .xattr("security.capability", file_capability(13)),
        Entry::dir("usr").mode(0o750),
        Entry::dir("data").xattr("user.dir", "data"),
        Entry::file("data/added_in_layer2", "layer 2\n"),
    ];

    ImageBuilder::new()
        .compression(Compression::Gzip)
        .layer(lower)
        .compression(Compression::Zstd)
        .layer(upper)
}

/// Image versions that differ in one large file, for dedup tests. All three have the
/// same small files and one layer; only [`LargeFileVersions::PATH`] differs.
#[derive(Debug, Clone)]
pub struct LargeFileVersions {
    /// The original.
    pub base: ImageBuilder,
    /// `change_len` bytes at `change_offset` rewritten in place (same size).
    pub changed_in_place: ImageBuilder,
    /// One byte inserted before `insert_offset` (size + 1).
    pub inserted: ImageBuilder,
    pub file_size: u64,
    pub change_offset: u64,
    pub change_len: u64,
    pub insert_offset: u64,
}

impl LargeFileVersions {
    /// Path of the large file in every version.
    pub const PATH: &'static str = "model/weights.bin";
}

/// Builds [`LargeFileVersions`] with a random file of `file_size` bytes. The in-place
/// change is 4 KiB in the middle of the file; the insertion is at a third of it.
pub fn large_file_versions(file_size: u64) -> LargeFileVersions {
    let base_content = Generator::random(file_size, 42);
    let change_offset = file_size / 2 + 1000;
    let change_len = 4096.min(file_size.saturating_sub(change_offset));
    let insert_offset = file_size / 3;
    let image = |content: Generator| {
        ImageBuilder::new().layer(vec![
            Entry::dir("model"),
            Entry::file("model/config.json", "{\"layers\": 12}\n"),
            Entry::generated_file(LargeFileVersions::PATH, content),
        ])
    };
    LargeFileVersions {
        base: image(base_content.clone()),
        changed_in_place: image(base_content.clone().with_region_changed(
            change_offset,
            change_len,
            4242,
        )),
        inserted: image(base_content.with_byte_inserted(insert_offset, 0x5A)),
        file_size,
        change_offset,
        change_len,
        insert_offset,
    }
}

/// A bad image: a valid first layer, then a layer with one problem.
#[derive(Debug, Clone)]
pub struct MaliciousImage {
    /// Short stable name, e.g. `dotdot_path`.
    pub name: &'static str,
    /// What is wrong, for messages.
    pub problem: &'static str,
    /// Index of the bad layer in `image.layers`.
    pub bad_layer: usize,
    /// The offending tar path, when the problem is one entry.
    pub bad_entry: Option<&'static [u8]>,
    /// False when skopeo or the registry would refuse the image (digest mismatch):
    /// use it from an OCI layout directory only.
    pub pushable: bool,
    pub image: ImageBuilder,
}

/// One image per kind of bad input a converter must reject with a clear error.
pub fn malicious_layers() -> Vec<MaliciousImage> {
    let good_layer = || {
        vec![
            Entry::dir("etc"),
            Entry::file("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
        ]
    };
    // Big enough that cutting it in half lands inside file data.
    let bulky_entries = || {
        vec![
            Entry::dir("data"),
            Entry::generated_file("data/blob", Generator::random(256 * 1024, 9)),
            Entry::file("data/after", "after"),
        ]
    };
    let bulky_tar = || layer_tar(&bulky_entries()).unwrap_or_default();
    let raw_blob = |blob: Vec<u8>, compression: Compression| Layer {
        content: LayerContent::RawBlob {
            blob,
            diff_id: format!("sha256:{}", sha256_hex(&bulky_tar())),
        },
        compression,
        corrupt_after_digest: false,
        diff_id_override: None,
    };
    let with_bad = |entries: Vec<Entry>| ImageBuilder::new().layer(good_layer()).layer(entries);
    let with_raw = |layer: Layer| ImageBuilder::new().layer(good_layer()).raw_layer(layer);

    let tar = bulky_tar();
    let gzip = Compression::Gzip.compress(&tar).unwrap_or_default();
    let zstd = Compression::Zstd.compress(&tar).unwrap_or_default();

    let mut images = vec![
        MaliciousImage {
            name: "dotdot_path",
            problem: "entry path contains `..` and escapes the root",
            bad_layer: 1,
            bad_entry: Some(b"../escaped"),
            pushable: true,
            image: with_bad(vec![Entry::file("../escaped", "evil")]),
        },
        MaliciousImage {
            name: "dotdot_inside_path",
            problem: "entry path goes up through `..` past the root",
            bad_layer: 1,
            bad_entry: Some(b"etc/../../escaped"),
            pushable: true,
            image: with_bad(vec![Entry::file("etc/../../escaped", "evil")]),
        },
        MaliciousImage {
            name: "absolute_path",
            problem: "entry path is absolute",
            bad_layer: 1,
            bad_entry: Some(b"/etc/evil"),
            pushable: true,
            image: with_bad(vec![Entry::file("/etc/evil", "evil")]),
        },
        MaliciousImage {
            name: "hardlink_escape",
            problem: "hardlink target escapes the root",
            bad_layer: 1,
            bad_entry: Some(b"etc/shadow"),
            pushable: true,
            image: with_bad(vec![Entry::hardlink("etc/shadow", "../../etc/shadow")]),
        },
        MaliciousImage {
            name: "hardlink_absolute",
            problem: "hardlink target is an absolute path",
            bad_layer: 1,
            bad_entry: Some(b"etc/shadow"),
            pushable: true,
            image: with_bad(vec![Entry::hardlink("etc/shadow", "/etc/shadow")]),
        },
        MaliciousImage {
            name: "whiteout_escape",
            problem: "whiteout names `..` and would delete outside the root",
            bad_layer: 1,
            bad_entry: Some(b".wh..."),
            pushable: true,
            image: with_bad(vec![Entry::whiteout("..")]),
        },
        MaliciousImage {
            name: "whiteout_escape_nested",
            problem: "whiteout path goes up through `..` past the root",
            bad_layer: 1,
            bad_entry: Some(b"etc/../../.wh.etc"),
            pushable: true,
            image: with_bad(vec![Entry::whiteout("etc/../../etc")]),
        },
        MaliciousImage {
            name: "truncated_gzip",
            problem: "gzip stream ends early",
            bad_layer: 1,
            bad_entry: None,
            pushable: true,
            image: with_raw(raw_blob(gzip[..gzip.len() / 2].to_vec(), Compression::Gzip)),
        },
        MaliciousImage {
            name: "corrupt_gzip",
            problem: "gzip stream has corrupted bytes",
            bad_layer: 1,
            bad_entry: None,
            pushable: true,
            image: with_raw(raw_blob(corrupt_middle(&gzip), Compression::Gzip)),
        },
        MaliciousImage {
            name: "truncated_zstd",
            problem: "zstd stream ends early",
            bad_layer: 1,
            bad_entry: None,
            pushable: true,
            image: with_raw(raw_blob(zstd[..zstd.len() / 2].to_vec(), Compression::Zstd)),
        },
        MaliciousImage {
            name: "corrupt_zstd",
            problem: "zstd stream has corrupted bytes",
            bad_layer: 1,
            bad_entry: None,
            pushable: true,
            image: with_raw(raw_blob(corrupt_middle(&zstd), Compression::Zstd)),
        },
        MaliciousImage {
            name: "truncated_tar",
            problem: "tar stream ends inside an entry",
            bad_layer: 1,
            bad_entry: Some(b"data/blob"),
            pushable: true,
            image: with_raw(Layer {
                content: LayerContent::RawTar(tar[..tar.len() / 2].to_vec()),
                compression: Compression::Gzip,
                corrupt_after_digest: false,
                diff_id_override: None,
            }),
        },
        MaliciousImage {
            name: "digest_mismatch",
            problem: "layer blob does not match the digest in the manifest",
            bad_layer: 1,
            bad_entry: None,
            pushable: false,
            image: with_raw(Layer {
                corrupt_after_digest: true,
                ..Layer::entries(bulky_entries(), Compression::Gzip)
            }),
        },
        MaliciousImage {
            name: "diff_id_mismatch",
            problem: "uncompressed layer does not match the diff_id in the config",
            bad_layer: 1,
            bad_entry: None,
            pushable: true,
            image: with_raw(Layer {
                diff_id_override: Some(format!("sha256:{}", "0".repeat(64))),
                ..Layer::entries(bulky_entries(), Compression::Gzip)
            }),
        },
    ];
    images.sort_by_key(|image| image.name);
    images
}

fn corrupt_middle(bytes: &[u8]) -> Vec<u8> {
    let mut corrupted = bytes.to_vec();
    let middle = corrupted.len() / 2;
    for byte in corrupted.iter_mut().skip(middle).take(16) {
        *byte ^= 0x55;
    }
    corrupted
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// Two small images for linux/amd64 and linux/arm64 with different contents (each has
/// `etc/arch` naming its architecture), for [`super::write_multi_platform_layout`].
pub fn multi_platform_images() -> Vec<ImageBuilder> {
    ["amd64", "arm64"]
        .into_iter()
        .map(|arch| {
            ImageBuilder::new()
                .platform(Platform::linux(arch))
                .layer(vec![
                    Entry::dir("etc"),
                    Entry::file("etc/arch", format!("{arch}\n")),
                    Entry::dir("bin"),
                    Entry::generated_file("bin/payload", Generator::random(64 * 1024, 7)),
                ])
        })
        .collect()
}
