//! The external tools used around test images: `skopeo` to push a layout to a registry,
//! `umoci` to unpack a layout into the reference root filesystem.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::layout::{ANNOTATION_REF_NAME, blob_path};
use crate::{TestkitError, find_tool};

/// Pushes `tag` of the OCI layout at `layout_dir` to `registry_host` (e.g. `127.0.0.1:5000`)
/// as `repo_tag` (e.g. `test/standard:v1`), over plain HTTP. Image indexes are pushed with
/// all their platforms; digests are kept as they are in the layout.
///
/// Runs `skopeo --insecure-policy copy --quiet --all --preserve-digests
/// --dest-tls-verify=false oci:DIR:TAG docker://HOST/REPO:TAG`.
pub fn push_layout(
    layout_dir: &Path,
    tag: &str,
    registry_host: &str,
    repo_tag: &str,
) -> Result<(), TestkitError> {
    let skopeo = find_tool("skopeo").ok_or_else(|| TestkitError::ToolMissing {
        tool: "skopeo".into(),
        hint: "install the Debian package `skopeo` (`make deps` does)".into(),
    })?;
    let source = format!("oci:{}:{tag}", layout_dir.display());
    let destination = format!("docker://{registry_host}/{repo_tag}");
    run(Command::new(skopeo).args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &source,
        &destination,
    ]))
}

/// Unpacks `tag` of the OCI layout at `layout_dir` with `umoci unpack` into the bundle
/// directory `dest` (which must not exist yet) and returns the root filesystem,
/// `dest/rootfs`. Needs root to create devices and set owners and `security.*` xattrs.
///
/// umoci 0.4.7 cannot read zstd layers: if the image has any, skopeo first recompresses
/// the image to gzip into `DEST.gzip-layout` (only the compression changes, the tar
/// streams and so the root filesystem stay the same).
pub fn unpack_reference(
    layout_dir: &Path,
    tag: &str,
    dest: &Path,
) -> Result<PathBuf, TestkitError> {
    let umoci = find_tool("umoci").ok_or_else(|| TestkitError::ToolMissing {
        tool: "umoci".into(),
        hint: "install the Debian package `umoci` (`make deps` does)".into(),
    })?;
    let mut layout_dir = layout_dir.to_path_buf();
    if has_zstd_layers(&layout_dir, tag)? {
        let mut gzip_layout = dest.as_os_str().to_owned();
        gzip_layout.push(".gzip-layout");
        let gzip_layout = PathBuf::from(gzip_layout);
        recompress_gzip(&layout_dir, tag, &gzip_layout)?;
        layout_dir = gzip_layout;
    }
    let image = format!("{}:{tag}", layout_dir.display());
    run(Command::new(umoci)
        .args(["unpack", "--image", &image])
        .arg(dest))?;
    Ok(dest.join("rootfs"))
}

/// True if the manifest tagged `tag` in the layout has a zstd layer.
fn has_zstd_layers(layout_dir: &Path, tag: &str) -> Result<bool, TestkitError> {
    let read_json = |path: PathBuf| -> Result<serde_json::Value, TestkitError> {
        let bytes = std::fs::read(&path)
            .map_err(|e| TestkitError::io(format!("reading {}", path.display()), e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| TestkitError::InvalidImage(format!("{}: {e}", path.display())))
    };
    let index = read_json(layout_dir.join("index.json"))?;
    let Some(manifest) = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"][ANNOTATION_REF_NAME] == tag)
    else {
        return Err(TestkitError::InvalidImage(format!(
            "no tag {tag} in {}",
            layout_dir.display()
        )));
    };
    let digest = manifest["digest"].as_str().unwrap_or_default();
    let manifest = read_json(blob_path(layout_dir, digest))?;
    Ok(manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|layer| {
            layer["mediaType"]
                .as_str()
                .is_some_and(|t| t.ends_with("+zstd"))
        }))
}

fn recompress_gzip(layout_dir: &Path, tag: &str, dest: &Path) -> Result<(), TestkitError> {
    let skopeo = find_tool("skopeo").ok_or_else(|| TestkitError::ToolMissing {
        tool: "skopeo".into(),
        hint: "needed to recompress zstd layers for umoci; install the Debian package `skopeo`"
            .into(),
    })?;
    let source = format!("oci:{}:{tag}", layout_dir.display());
    let destination = format!("oci:{}:{tag}", dest.display());
    run(Command::new(skopeo).args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-compress",
        "--dest-compress-format",
        "gzip",
        &source,
        &destination,
    ]))
}

fn run(command: &mut Command) -> Result<(), TestkitError> {
    let description = format!("{command:?}");
    let output = command
        .output()
        .map_err(|e| TestkitError::io(format!("running {description}"), e))?;
    if output.status.success() {
        return Ok(());
    }
    Err(TestkitError::ToolFailed {
        command: description,
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}
