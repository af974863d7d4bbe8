//! `stoker convert`.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, ValueEnum};
use stoker_convert::{ConvertOptions, ConvertReport};
use stoker_format::Chunking;

use crate::image_args::RegistryArgs;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ChunkingKind {
    /// Fixed-size chunks.
    Fixed,
    /// Content-defined chunks (FastCDC): versions of a file share chunks after insertions.
    Cdc,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The image: host[:port]/repo:tag, host[:port]/repo@sha256:…, or oci:DIR[:TAG].
    pub source: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// How to cut files into chunks.
    #[arg(long, value_enum, default_value = "fixed")]
    pub chunking: ChunkingKind,
    /// Chunk size in bytes (the average size with --chunking cdc).
    #[arg(long, default_value_t = 1 << 20)]
    pub chunk_size: u32,
    /// zstd compression level for chunks.
    #[arg(long, default_value_t = 3)]
    pub zstd_level: i32,
    /// Directory for blobs waiting to be uploaded (default: the system temp dir).
    #[arg(long)]
    pub staging_dir: Option<PathBuf>,
    /// Refuse images with setuid/setgid files.
    #[arg(long)]
    pub deny_setuid: bool,
    /// Refuse images with device files.
    #[arg(long)]
    pub deny_devices: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: ConvertArgs) -> anyhow::Result<()> {
    if !(1..=22).contains(&args.zstd_level) {
        bail!("--zstd-level must be between 1 and 22");
    }
    let (store, selector) = args.registry.open(&args.source)?;
    let options = ConvertOptions {
        chunking: match args.chunking {
            ChunkingKind::Fixed => Chunking::Fixed {
                size: args.chunk_size,
            },
            ChunkingKind::Cdc => Chunking::Cdc {
                avg_size: args.chunk_size,
            },
        },
        zstd_level: args.zstd_level,
        platforms: args.registry.platform.clone(),
        staging_dir: args.staging_dir.clone(),
        progress: !args.json,
        deny_setuid: args.deny_setuid,
        deny_devices: args.deny_devices,
    };
    let reports = stoker_convert::convert(&store, &selector, &options).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for report in &reports {
            print_report(report);
        }
    }
    Ok(())
}

fn print_report(r: &ConvertReport) {
    let s = &r.summary;
    let p = &r.packing;
    let blob_bytes: u64 = r.blobs.iter().map(|b| b.1).sum();
    println!(
        "converted {}{}",
        r.source_manifest,
        r.platform
            .as_ref()
            .map(|p| format!(" ({p})"))
            .unwrap_or_default()
    );
    println!("  artifact      {}", r.artifact);
    println!(
        "  index         {} ({} compressed, {} in memory)",
        r.index_digest,
        human(r.index_bytes),
        human(r.index_raw_bytes)
    );
    println!(
        "  files         {} regular, {} directories, {} symlinks, {} other; {} of file data",
        s.regular_files,
        s.directories,
        s.symlinks,
        s.other_files,
        human(s.file_bytes)
    );
    println!(
        "  chunks        {} stored ({}), {} duplicates skipped ({}), {} of zeros stored as holes",
        s.chunks,
        human(s.chunk_bytes),
        p.duplicate_chunks,
        human(p.duplicate_bytes),
        human(p.zero_bytes)
    );
    println!(
        "  blobs         {} ({} compressed)",
        r.blobs.len(),
        human(blob_bytes)
    );
    println!(
        "  time          {:.2} s, {:.0} MB/s",
        r.seconds,
        r.throughput_mb_s()
    );
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
