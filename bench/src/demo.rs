//! `make demo`: the main job on one machine. A registry on loopback, a
//! generated ML-like image, `stoker convert`, then the image's startup read
//! (a Python-style import of some modules and libraries plus one weight file's
//! header) done two ways: pull + unpack everything first (skopeo + umoci, as a
//! node does today), and `stoker mount` reading only what it needs; then a
//! warm start from the node cache. Prints time and bytes for each.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use stoker_testkit::registry::TestRegistry;

use crate::images::{MlImageSize, ml_image};
use crate::report::{Section, mb};

/// The files the "startup" reads: every 10th module, every 8th library, and
/// the first 4 MiB of the first weight file.
fn startup_reads(root: &Path) -> anyhow::Result<u64> {
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut read_file = |path: &Path, limit: u64| -> anyhow::Result<()> {
        let mut file = std::fs::File::open(path).with_context(|| path.display().to_string())?;
        let mut left = limit;
        while left > 0 {
            let n = file.read(&mut buf[..(left.min(1 << 20)) as usize])?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
            left -= n as u64;
        }
        Ok(())
    };
    for pkg in 0..100 {
        let dir = root.join(format!("opt/venv/pkg{pkg}"));
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        for path in names.iter().step_by(10) {
            read_file(path, u64::MAX)?;
        }
    }
    let mut libs: Vec<PathBuf> = std::fs::read_dir(root.join("usr/lib"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    libs.sort();
    for path in libs.iter().step_by(8) {
        read_file(path, u64::MAX)?;
    }
    read_file(&root.join("models/weights0.bin"), 4 << 20)?;
    Ok(bytes)
}

fn blob_bytes_served(registry: &TestRegistry) -> u64 {
    registry
        .requests()
        .iter()
        .filter(|r| r.is_blob_get())
        .map(|r| r.response_bytes)
        .sum()
}

fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let path = path.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path.as_ref()))
}

fn stoker_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.with_file_name("stoker")
}

fn mount(reference: &str, mountpoint: &Path, cache: &Path) -> anyhow::Result<Child> {
    let child = Command::new(stoker_bin())
        .args(["mount", "--plain-http", reference])
        .arg(mountpoint)
        .arg("--cache-dir")
        .arg(cache)
        .stderr(Stdio::null())
        .spawn()
        .context("starting stoker mount (build it with `cargo build --release -p stoker-cli`)")?;
    if !stoker_testkit::wait_until(Duration::from_secs(60), Duration::from_millis(5), || {
        is_mounted(mountpoint)
    }) {
        bail!("stoker mount did not mount {}", mountpoint.display());
    }
    Ok(child)
}

fn unmount(mut child: Child) -> anyhow::Result<()> {
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    child.wait()?;
    Ok(())
}

pub async fn run(size: MlImageSize) -> anyhow::Result<Section> {
    let work = tempfile::tempdir()?;
    let registry = TestRegistry::start().context("starting docker-registry")?;
    let (image, total) = ml_image(size);
    eprintln!(
        "demo: building a {} image and pushing it to {}",
        mb(total),
        registry.host()
    );
    let layout = work.path().join("layout");
    let written = image.write_layout(&layout, "v1")?;
    let compressed: u64 = written.layers.iter().map(|l| l.blob.size).sum();
    stoker_testkit::image::push_layout(&layout, "v1", &registry.host(), "demo/ml:v1")?;
    let reference = format!("{}/demo/ml:v1", registry.host());

    eprintln!("demo: stoker convert {reference}");
    let status = Command::new(stoker_bin())
        .args(["convert", "--plain-http", &reference])
        .status()?;
    if !status.success() {
        bail!("stoker convert failed");
    }

    let mut section = Section::new(
        "Demo: time to a finished startup read",
        &format!(
            "A {} image ({} compressed). The startup reads a tenth of the Python modules, an eighth of the \
             libraries and the first 4 MiB of a weight file. `full pull` copies the image from the registry \
             and unpacks it (skopeo + umoci, what a node does before a container can start); `stoker lazy` \
             mounts the image and reads through FUSE with an empty cache; `stoker warm` does it again on the \
             node's cache.",
            mb(total),
            mb(compressed)
        ),
        &[
            "start",
            "time",
            "bytes from registry",
            "bytes read",
            "time vs full pull",
        ],
    );

    // 1. Full pull and unpack.
    registry.clear_requests();
    let started = Instant::now();
    let pulled = work.path().join("pulled");
    let status = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
        ])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:v1", pulled.display()))
        .status()?;
    if !status.success() {
        bail!("skopeo copy failed");
    }
    let bundle = work.path().join("bundle");
    let status = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:v1", pulled.display()))
        .arg(&bundle)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("umoci unpack failed");
    }
    let read = startup_reads(&bundle.join("rootfs"))?;
    let full_secs = started.elapsed().as_secs_f64();
    let full_bytes = blob_bytes_served(&registry);
    section.row(vec![
        "full pull + unpack".into(),
        format!("{full_secs:.2} s"),
        mb(full_bytes),
        mb(read),
        "1.00".into(),
    ]);

    // 2. Lazy, cold cache; 3. warm cache.
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir(&mountpoint)?;
    let cache = work.path().join("cache");
    for name in ["stoker lazy (cold cache)", "stoker warm (node cache)"] {
        registry.clear_requests();
        let started = Instant::now();
        let child = mount(&reference, &mountpoint, &cache)?;
        let read = startup_reads(&mountpoint)?;
        let secs = started.elapsed().as_secs_f64();
        unmount(child)?;
        let fetched = blob_bytes_served(&registry);
        section.row(vec![
            name.into(),
            format!("{secs:.2} s"),
            mb(fetched),
            mb(read),
            format!("{:.2}", secs / full_secs),
        ]);
    }
    section.note("Registry on loopback: on a real network the full pull pays for every byte, so the gap grows.");
    Ok(section)
}
