//! Conversion throughput and index size, with `skopeo copy` of the same image
//! between two registries as the I/O reference.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use stoker_convert::{ConvertOptions, ImageStore};
use stoker_format::Chunking;
use stoker_registry::{RegistryClient, RegistryConfig};
use stoker_testkit::registry::TestRegistry;

use crate::images::{MlImageSize, ml_image};
use crate::report::{Section, mb};

pub async fn run(size: MlImageSize) -> anyhow::Result<Section> {
    let work = tempfile::tempdir()?;
    let source = TestRegistry::start().context("registry")?;
    let copy_target = TestRegistry::start().context("second registry")?;
    let (image, total_bytes) = ml_image(size);
    eprintln!("bench convert: writing a {} image", mb(total_bytes));
    let layout = work.path().join("layout");
    let written = image.write_layout(&layout, "v1")?;
    let compressed: u64 = written.layers.iter().map(|l| l.blob.size).sum();
    stoker_testkit::image::push_layout(&layout, "v1", &source.host(), "bench/ml:v1")?;
    let reference = format!("{}/bench/ml:v1", source.host());

    let mut section = Section::new(
        "Conversion (`stoker convert`)",
        &format!(
            "A generated {} image (3 gzip layers, {} compressed) with a realistic mix: {} small text files, {} \
             shared-library-like files, {} incompressible weight files. Registry: Debian's docker-registry on \
             loopback. Conversion reads from and writes to it; `skopeo copy` copies the same image to a second \
             local registry as the I/O reference. Throughput is uncompressed image bytes per second.",
            mb(total_bytes),
            mb(compressed),
            size.small_files,
            size.libraries,
            size.weight_files
        ),
        &[
            "run",
            "time",
            "throughput",
            "index size",
            "index / image",
            "blobs",
            "vs skopeo copy",
        ],
    );

    let started = Instant::now();
    let status = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .arg(format!("docker://{reference}"))
        .arg(format!("docker://{}/bench/ml:v1", copy_target.host()))
        .status()
        .context("running skopeo")?;
    if !status.success() {
        bail!("skopeo copy failed");
    }
    let skopeo_secs = started.elapsed().as_secs_f64();
    section.row(vec![
        "skopeo copy (reference)".into(),
        format!("{skopeo_secs:.2} s"),
        format!("{:.0} MB/s", total_bytes as f64 / 1e6 / skopeo_secs),
        "-".into(),
        "-".into(),
        mb(compressed),
        "1.00".into(),
    ]);

    for (name, chunking) in [
        (
            "stoker convert, fixed 1 MiB",
            Chunking::Fixed { size: 1 << 20 },
        ),
        (
            "stoker convert, CDC avg 1 MiB",
            Chunking::Cdc { avg_size: 1 << 20 },
        ),
    ] {
        stoker_registry::install_crypto_provider();
        let client = RegistryClient::new(RegistryConfig {
            plain_http: true,
            docker_config: None,
            ..RegistryConfig::default()
        })?;
        let (store, selector) = ImageStore::registry(client, &reference)?;
        let options = ConvertOptions {
            chunking,
            staging_dir: Some(work.path().to_path_buf()),
            ..ConvertOptions::default()
        };
        let started = Instant::now();
        let reports = stoker_convert::convert(&store, &selector, &options).await?;
        let secs = started.elapsed().as_secs_f64();
        let report = &reports[0];
        let blob_bytes: u64 = report.blobs.iter().map(|b| b.1).sum();
        section.row(vec![
            name.into(),
            format!("{secs:.2} s"),
            format!("{:.0} MB/s", total_bytes as f64 / 1e6 / secs),
            format!("{} KB", report.index_bytes / 1000),
            format!(
                "{:.3} %",
                report.index_bytes as f64 * 100.0 / total_bytes as f64
            ),
            mb(blob_bytes),
            format!("{:.2}×", secs / skopeo_secs),
        ]);
    }
    section
        .note("Goals: index under 0.1 % of the image; conversion at 300 MB/s or more on 2 cores.");
    section.note(
        "`vs skopeo copy` is conversion time over copy time: skopeo moves compressed blobs without looking \
         inside, the converter decompresses, hashes, recompresses and uploads every byte.",
    );
    Ok(section)
}
