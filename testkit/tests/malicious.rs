//! Each malicious image is bad in exactly the way its name says, as seen by standard
//! decoders (flate2, zstd, the tar crate), so converter tests reject it for that reason.

use std::io::Read;

use sha2::{Digest, Sha256};
use stoker_testkit::image::{Compression, MaliciousImage, blob_path, malicious_layers};

/// Decompresses a whole layer blob.
fn decompress(blob: &[u8], media_type: &str) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    if media_type == Compression::Gzip.media_type() {
        flate2::read::GzDecoder::new(blob).read_to_end(&mut out)?;
    } else if media_type == Compression::Zstd.media_type() {
        zstd::stream::read::Decoder::new(blob)?.read_to_end(&mut out)?;
    } else {
        out = blob.to_vec();
    }
    Ok(out)
}

/// Paths of all entries, reading every entry's data (so truncation shows up).
fn tar_paths(tar: &[u8]) -> std::io::Result<Vec<Vec<u8>>> {
    let mut archive = tar::Archive::new(tar);
    let mut paths = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        paths.push(entry.path_bytes().into_owned());
        std::io::copy(&mut entry, &mut std::io::sink())?;
    }
    Ok(paths)
}

fn check(bad: &MaliciousImage) {
    let work = tempfile::tempdir().expect("tempdir");
    let written = bad.image.write_layout(work.path(), "bad").expect("layout");
    let layer = &written.layers[bad.bad_layer];
    let blob = std::fs::read(blob_path(work.path(), &layer.blob.digest)).expect("blob");
    let blob_digest = format!("sha256:{}", hex::encode(Sha256::digest(&blob)));
    let decompressed = decompress(&blob, &layer.blob.media_type);

    match bad.name {
        "digest_mismatch" => assert_ne!(blob_digest, layer.blob.digest),
        "truncated_gzip" | "corrupt_gzip" | "truncated_zstd" | "corrupt_zstd" => {
            assert_eq!(blob_digest, layer.blob.digest);
            assert!(decompressed.is_err(), "{} decompresses", bad.name);
        }
        "truncated_tar" => {
            let tar = decompressed.expect("compression is fine");
            assert!(tar_paths(&tar).is_err(), "tar reads completely");
        }
        "diff_id_mismatch" => {
            let tar = decompressed.expect("compression is fine");
            let tar_digest = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
            assert_ne!(tar_digest, layer.diff_id);
            tar_paths(&tar).expect("tar is fine");
        }
        _ => {
            let tar = decompressed.expect("compression is fine");
            let paths = tar_paths(&tar).expect("tar is fine");
            let bad_entry = bad.bad_entry.expect("path problems name their entry");
            assert!(
                paths.iter().any(|p| p == bad_entry),
                "{}: {paths:?}",
                bad.name
            );
        }
    }
}

#[test]
fn malicious_images_are_bad_the_way_they_say() {
    let all = malicious_layers();
    let names: Vec<&str> = all.iter().map(|bad| bad.name).collect();
    for expected in [
        "dotdot_path",
        "absolute_path",
        "hardlink_escape",
        "whiteout_escape",
        "truncated_gzip",
        "corrupt_gzip",
        "truncated_zstd",
        "corrupt_zstd",
        "truncated_tar",
        "digest_mismatch",
        "diff_id_mismatch",
    ] {
        assert!(names.contains(&expected), "missing {expected}");
    }
    for bad in &all {
        check(bad);
        assert!(
            bad.image.expected_tree().is_err(),
            "{} has no valid tree",
            bad.name
        );
    }
}
