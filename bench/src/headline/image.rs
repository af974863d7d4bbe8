//! The headline benchmark's image: a real Python image built by the project, offline
//! from the package registries only.
//!
//! - layer 1, **base**: Debian bookworm, `debootstrap --variant=minbase --include=python3`
//!   from deb.debian.org (apt caches and lists removed);
//! - layer 2, **packages**: [`PACKAGES`] installed with the host's pip
//!   (`python3 -m pip install --only-binary=:all: --target …`: the host Python is 3.11
//!   like bookworm's, so cp311 manylinux wheels fit; pip byte-compiles them, so the
//!   container does not compile at import), into `/usr/local/lib/python3.11/dist-packages`;
//! - layer 3, **app**: `/app/start.py` (imports the packages, computes, prints one line)
//!   and `/app/start.sh`, which execs it.
//!
//! Each layer is a `umoci repack` of one bundle, into an OCI layout cached under [`CACHE_ROOT`], keyed by everything above:
//! a second `make bench` reuses it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use stoker_format::Digest;

/// Where built images are kept between runs.
pub(crate) const CACHE_ROOT: &str = "/var/tmp/stoker-bench-cache";
/// The tag of the image in its layout.
pub(crate) const TAG: &str = "v1";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
const SITE_PACKAGES: &str = "/usr/local/lib/python3.11/dist-packages";

/// The pip packages of layer 2, pinned (their dependencies come with them).
pub(crate) const PACKAGES: &[&str] = &[
    "numpy==2.4.6",
    "scipy==1.17.1",
    "pandas==3.1.1",
    "scikit-learn==1.9.1",
    "pyarrow==26.0.1",
    "polars==2.1.0",
    "sympy==1.14.0",
    "matplotlib==3.11.2",
    "opencv-python-headless==5.0.0.93",
    "tensorflow-cpu==2.21.0",
];

/// What the container prints first, followed by the computed numbers.
pub(crate) const READY_PREFIX: &str = "stoker headline: ready";

/// The start command: imports every package, computes with each, prints one line.
const START_PY: &str = r#"import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import scipy.linalg, scipy.optimize
import pandas as pd
import pyarrow as pa
import polars as pl
import sympy
import sklearn.linear_model, sklearn.ensemble
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import cv2
import tensorflow as tf

rng = np.random.default_rng(7)
a = rng.standard_normal((256, 256))
lu = scipy.linalg.lu_factor(a + 256 * np.eye(256))
root = scipy.optimize.brentq(lambda x: x**3 - 2, 0, 2)
frame = pd.DataFrame({"k": rng.integers(0, 8, 4096), "v": rng.standard_normal(4096)})
groups = frame.groupby("k")["v"].mean()
table = pa.Table.from_pandas(frame)
pl_sum = pl.from_arrow(table).group_by("k").agg(pl.col("v").sum()).height
x = sympy.symbols("x")
integral = sympy.integrate(sympy.sin(x) ** 2, (x, 0, sympy.pi))
features = rng.standard_normal((512, 8))
labels = features @ np.arange(8) + 0.1 * rng.standard_normal(512)
ridge = sklearn.linear_model.Ridge().fit(features, labels).score(features, labels)
forest = sklearn.ensemble.RandomForestRegressor(n_estimators=8, random_state=0).fit(features, labels)
fig = plt.figure()
plt.plot(groups.values)
plt.close(fig)
blurred = cv2.GaussianBlur(np.ones((64, 64), np.float32), (5, 5), 0)
model = tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(4), tf.keras.layers.Dense(1)])
prediction = model(features[:4].astype("float32")).shape
print(f"STOKER_READY_PREFIX lu={lu[0][0][0]:.3f} root={root:.4f} groups={len(groups)} "
      f"polars={pl_sum} integral={integral} ridge={ridge:.3f} blur={blurred.sum():.0f} "
      f"tf={tuple(prediction)}", flush=True)
"#;

const START_SH: &str = "#!/bin/sh\nexec python3 /app/start.py\n";

/// A built image in an OCI layout.
pub(crate) struct PythonImage {
    /// The OCI layout directory (tag [`TAG`]).
    pub layout: PathBuf,
    /// Bytes of the files in the image (base + packages + app).
    pub file_bytes: u64,
    /// Compressed sizes of its layers (base, packages, app).
    pub layer_bytes: Vec<u64>,
    /// Whether this run built it (false: reused from the cache).
    pub built: bool,
}

impl PythonImage {
    pub fn compressed_bytes(&self) -> u64 {
        self.layer_bytes.iter().sum()
    }
}

/// The start script as written into the image.
fn start_py() -> String {
    START_PY.replace("STOKER_READY_PREFIX", READY_PREFIX)
}

/// Everything the image is made of, hashed: the cache key.
fn cache_key() -> String {
    let recipe = format!(
        "stoker-headline-image v3\n{SUITE} {MIRROR} minbase python3\n{}\n{SITE_PACKAGES}\n{}\n{START_SH}",
        PACKAGES.join("\n"),
        start_py()
    );
    Digest::of(recipe.as_bytes()).to_string()["sha256:".len()..][..16].to_string()
}

/// The cached image if it is complete, or builds it (several minutes: downloads
/// about 600 MB of packages, then gzips about 2.5 GB with umoci).
pub(crate) fn build_or_reuse() -> anyhow::Result<PythonImage> {
    let dir = Path::new(CACHE_ROOT).join(format!("python-{}", cache_key()));
    let layout = dir.join("layout");
    let complete = dir.join("complete");
    let built = if complete.exists() {
        eprintln!("headline: reusing the image in {}", layout.display());
        false
    } else {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing the incomplete {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)?;
        build(&dir, &layout)?;
        let file_bytes = tree_bytes(&dir.join("bundle/rootfs"))?;
        std::fs::write(dir.join("file-bytes"), file_bytes.to_string())?;
        // The layout is all the benchmark needs; the trees are large.
        std::fs::remove_dir_all(dir.join("bundle"))?;
        std::fs::write(&complete, PACKAGES.join("\n"))?;
        true
    };
    let file_bytes = std::fs::read_to_string(dir.join("file-bytes"))?
        .trim()
        .parse()
        .context("file-bytes in the image cache")?;
    Ok(PythonImage {
        layer_bytes: layer_sizes(&layout)?,
        layout,
        file_bytes,
        built,
    })
}

fn build(dir: &Path, layout: &Path) -> anyhow::Result<()> {
    // Each layer is a `umoci repack --refresh-bundle` of one bundle: debootstrap fills it,
    // then pip, then the app. (umoci 0.4.7's `insert` leaves the last file of a layer
    // truncated, and names the root "/", an absolute path converters refuse.)
    let bundle = dir.join("bundle");
    let rootfs = bundle.join("rootfs");
    let site = rootfs.join(SITE_PACKAGES.trim_start_matches('/'));
    let app = rootfs.join("app");
    let image = format!("{}:{TAG}", layout.display());
    umoci(&["init", "--layout", &layout.to_string_lossy()])?;
    umoci(&["new", "--image", &image])?;
    umoci(&["unpack", "--image", &image, &bundle.to_string_lossy()])?;

    if stoker_testkit::find_tool("debootstrap").is_none() {
        eprintln!("headline: installing debootstrap (apt-get)");
        let install = || {
            run(Command::new("apt-get").args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "debootstrap",
            ]))
        };
        install()
            .or_else(|_| {
                run(Command::new("apt-get").args(["update", "-q"]))?;
                install()
            })
            .context("installing debootstrap")?;
    }
    eprintln!(
        "headline: debootstrap {SUITE} (minbase + python3) into {}",
        rootfs.display()
    );
    let debootstrap = stoker_testkit::find_tool("debootstrap")
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/debootstrap"));
    run(Command::new(debootstrap)
        .args(["--variant=minbase", "--include=python3", SUITE])
        .arg(&rootfs)
        .arg(MIRROR))
    .context("debootstrap")?;
    let left = stoker_testkit::containerd::mountpoints_under(&rootfs.to_string_lossy());
    if !left.is_empty() {
        bail!(
            "debootstrap left mounts under {}: {left:?}",
            rootfs.display()
        );
    }
    for cache in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let cache = rootfs.join(cache);
        for entry in std::fs::read_dir(&cache)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
            }
        }
    }

    repack(
        &image,
        &bundle,
        "base: debootstrap --variant=minbase --include=python3",
    )?;

    eprintln!("headline: pip install {} packages", PACKAGES.len());
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--only-binary=:all:", "--target"])
        .arg(&site)
        .args(PACKAGES))
    .context("pip install (the host's python3 must be 3.11, like bookworm's)")?;

    repack(&image, &bundle, "packages: pip install --target")?;

    std::fs::create_dir_all(&app)?;
    std::fs::write(app.join("start.py"), start_py())?;
    std::fs::write(app.join("start.sh"), START_SH)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(app.join("start.sh"), std::fs::Permissions::from_mode(0o755))?;

    repack(&image, &bundle, "app: /app/start.py")?;
    umoci(&[
        "config",
        "--image",
        &image,
        "--config.cmd",
        "/app/start.sh",
        "--config.env",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--config.env",
        "PYTHONDONTWRITEBYTECODE=1",
        "--config.workingdir",
        "/app",
    ])?;
    Ok(())
}

/// One more layer: what changed in the bundle since the last repack.
fn repack(image: &str, bundle: &Path, comment: &str) -> anyhow::Result<()> {
    eprintln!("headline: umoci repack ({comment})");
    umoci(&[
        "repack",
        "--refresh-bundle",
        "--history.comment",
        comment,
        "--image",
        image,
        &bundle.to_string_lossy(),
    ])
}

fn umoci(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("umoci").args(args)).with_context(|| format!("umoci {}", args[0]))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = stderr
            .chars()
            .rev()
            .take(3000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        bail!("{command:?} failed with {}: {tail}", output.status);
    }
    Ok(())
}

/// Apparent bytes of the regular files under `root` (`du -sb --apparent-size`).
fn tree_bytes(root: &Path) -> anyhow::Result<u64> {
    let output = Command::new("du").args(["-s", "-b"]).arg(root).output()?;
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("du -sb {}", root.display()))
}

/// Compressed sizes of the image's layers, from its manifest.
fn layer_sizes(layout: &Path) -> anyhow::Result<Vec<u64>> {
    let blob = |digest: &str| -> anyhow::Result<serde_json::Value> {
        let hex = digest.strip_prefix("sha256:").context("digest")?;
        let path = layout.join("blobs/sha256").join(hex);
        Ok(serde_json::from_slice(
            &std::fs::read(&path).with_context(|| path.display().to_string())?,
        )?)
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let manifest_digest = index["manifests"]
        .as_array()
        .and_then(|m| {
            m.iter()
                .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == TAG)
        })
        .and_then(|m| m["digest"].as_str())
        .context("the image's tag in index.json")?;
    let manifest = blob(manifest_digest)?;
    manifest["layers"]
        .as_array()
        .context("manifest layers")?
        .iter()
        .map(|l| l["size"].as_u64().context("layer size"))
        .collect()
}
