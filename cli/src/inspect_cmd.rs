//! `stoker inspect` and `stoker ls`: read an image's artifact and index.

use std::io::Write;

use anyhow::Context;
use clap::Args;
use stoker_format::{FileKind, Index};

use crate::convert_cmd::human;
use crate::image_args::RegistryArgs;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The image: host[:port]/repo:tag, …@sha256:…, or oci:DIR[:TAG].
    pub image: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// The image.
    pub image: String,
    /// Directory (or file) inside the image.
    #[arg(default_value = "/")]
    pub path: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

async fn open_index(
    image: &str,
    registry: &RegistryArgs,
) -> anyhow::Result<(stoker_convert::artifact::FoundArtifact, Index)> {
    let (store, selector) = registry.open(image)?;
    let found =
        stoker_convert::find_artifact(&store, &selector, registry.single_platform()?).await?;
    let index = stoker_convert::load_index(&store, &found)
        .await
        .with_context(|| format!("loading index {}", found.index_digest))?;
    Ok((found, index))
}

pub async fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let (found, index) = open_index(&args.image, &args.registry).await?;
    let summary = index.summary();
    if args.json {
        let value = serde_json::json!({
            "image_manifest": found.image_manifest.to_string(),
            "platform": found.platform,
            "artifact": found.artifact.to_string(),
            "index": { "digest": found.index_digest.to_string(), "size": found.index_size, "raw_size": index.raw_len() },
            "chunking": format!("{:?}", index.chunking()),
            "blobs": found.blobs.iter().map(|(d, s)| serde_json::json!({"digest": d.to_string(), "size": s})).collect::<Vec<_>>(),
            "summary": summary,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!(
        "image     {}{}",
        found.image_manifest,
        found
            .platform
            .map(|p| format!(" ({p})"))
            .unwrap_or_default()
    );
    println!("artifact  {}", found.artifact);
    println!(
        "index     {} ({} compressed, {} in memory), {:?}",
        found.index_digest,
        human(found.index_size),
        human(index.raw_len() as u64),
        index.chunking()
    );
    println!(
        "files     {} regular ({}), {} directories, {} symlinks, {} other, {} hardlinked",
        summary.regular_files,
        human(summary.file_bytes),
        summary.directories,
        summary.symlinks,
        summary.other_files,
        summary.hardlinked_files
    );
    println!(
        "chunks    {} ({} uncompressed, {} compressed)",
        summary.chunks,
        human(summary.chunk_bytes),
        human(summary.compressed_chunk_bytes)
    );
    println!(
        "blobs     {} ({})",
        found.blobs.len(),
        human(found.blobs.iter().map(|b| b.1).sum())
    );
    Ok(())
}

pub async fn ls(args: LsArgs) -> anyhow::Result<()> {
    let (_, index) = open_index(&args.image, &args.registry).await?;
    let id = index
        .resolve(args.path.as_bytes())
        .with_context(|| format!("{}: no such file or directory in the image", args.path))?;
    let mut out = std::io::stdout().lock();
    let inode = index.inode(id).context("inode out of range")?;
    if inode.kind != FileKind::Dir {
        writeln!(out, "{}", line(&index, id, args.path.as_bytes()))?;
        return Ok(());
    }
    for (name, child) in index.dir_entries(id) {
        writeln!(out, "{}", line(&index, child, name))?;
    }
    Ok(())
}

/// `ls -l`-style line: mode, links, owner, size, name (and link target).
fn line(index: &Index, id: u32, name: &[u8]) -> String {
    let Some(inode) = index.inode(id) else {
        return String::new();
    };
    let kind = match inode.kind {
        FileKind::Dir => 'd',
        FileKind::File => '-',
        FileKind::Symlink => 'l',
        FileKind::CharDevice => 'c',
        FileKind::BlockDevice => 'b',
        FileKind::Fifo => 'p',
        FileKind::Socket => 's',
    };
    let mut text = format!(
        "{kind}{:04o} {:>3} {:>5}:{:<5} {:>12} {}",
        inode.mode & 0o7777,
        inode.nlink,
        inode.uid,
        inode.gid,
        inode.size,
        String::from_utf8_lossy(name)
    );
    if let Some(target) = index.symlink_target(id) {
        text.push_str(" -> ");
        text.push_str(&String::from_utf8_lossy(target));
    }
    text
}
