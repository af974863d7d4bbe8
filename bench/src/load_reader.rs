//! `stoker-bench read-file` (hidden): the reader the `load` section runs inside each
//! container.
//!
//! It opens one file of the image, regenerates the bytes the file must hold
//! (`images::incompressible(seed, len)`), says `ready`, waits on a barrier (a FIFO
//! bind-mounted from the host: reading starts when the host closes its end, so every
//! container starts reading at once), then reads every 4096-byte block once in a
//! scattered order, timing each read and checking its bytes. It writes one summary
//! line (JSON after [`SUMMARY_PREFIX`]) to standard output or to `--summary-file`, and
//! exits non-zero on any error or wrong byte.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

use crate::images::incompressible;

/// Size of every read.
pub const READ_SIZE: usize = 4096;
/// The line a reader prints once it is waiting on the barrier.
pub const READY_LINE: &str = "stoker-load: ready";
/// Prefix of the summary line; the rest is a JSON object.
pub const SUMMARY_PREFIX: &str = "stoker-load: ";

#[derive(clap::Args, Debug)]
pub struct ReadFileArgs {
    /// A FIFO to wait on before reading: reading starts at its end of file (when the
    /// last writer closes it).
    #[arg(long)]
    barrier: Option<PathBuf>,
    /// Seed of the expected contents (`images::incompressible`).
    #[arg(long)]
    seed: u64,
    /// Length of the file, in bytes.
    #[arg(long)]
    len: usize,
    /// Where to write the summary line (written to a temporary name, then renamed);
    /// standard output when absent.
    #[arg(long)]
    summary_file: Option<PathBuf>,
    /// The file to read.
    path: PathBuf,
}

/// Runs the reader; prints the summary line whatever happens.
pub fn run(args: ReadFileArgs) -> anyhow::Result<()> {
    let mut summary = Summary::default();
    let result = read_file(&args, &mut summary);
    if let Err(e) = &result {
        summary.errors += 1;
        summary.error = Some(format!("{e:#}"));
    }
    let line = serde_json::json!({
        "path": args.path.display().to_string(),
        "reads": summary.latencies_ns.len(),
        "bytes": summary.latencies_ns.len() * READ_SIZE,
        "errors": summary.errors,
        "error": summary.error,
        "started_unix_ns": summary.started_unix_ns,
        "finished_unix_ns": summary.finished_unix_ns,
        "latencies_ns": summary.latencies_ns,
    });
    match &args.summary_file {
        // A file, because `ctr run` can lose a quickly exiting container's last output.
        Some(path) => {
            let partial = path.with_extension("partial");
            std::fs::write(&partial, format!("{SUMMARY_PREFIX}{line}\n"))
                .with_context(|| format!("writing {}", partial.display()))?;
            std::fs::rename(&partial, path)
                .with_context(|| format!("renaming {}", partial.display()))?;
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{SUMMARY_PREFIX}{line}")?;
            stdout.flush()?;
        }
    }
    result
}

#[derive(Default)]
struct Summary {
    errors: u64,
    error: Option<String>,
    started_unix_ns: u64,
    finished_unix_ns: u64,
    latencies_ns: Vec<u64>,
}

fn read_file(args: &ReadFileArgs, summary: &mut Summary) -> anyhow::Result<()> {
    let path = &args.path;
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?
        .len();
    if len != args.len as u64 {
        bail!("{} holds {len} bytes, not {}", path.display(), args.len);
    }
    let expected = incompressible(args.seed, args.len);
    let blocks = args.len / READ_SIZE;
    summary.latencies_ns.reserve(blocks);

    let barrier = match &args.barrier {
        Some(fifo) => {
            Some(File::open(fifo).with_context(|| format!("opening {}", fifo.display()))?)
        }
        None => None,
    };
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{READY_LINE}")?;
        stdout.flush()?;
    }
    if let Some(mut barrier) = barrier {
        // Returns at end of file: when the host closes the FIFO's last write end.
        let mut byte = [0u8; 1];
        while barrier.read(&mut byte).context("waiting on the barrier")? > 0 {}
    }

    summary.started_unix_ns = unix_ns();
    let mut buffer = vec![0u8; READ_SIZE];
    // A stride coprime with the block count visits every block once.
    let stride = coprime_stride(blocks);
    for i in 0..blocks {
        let offset = (i * stride) % blocks * READ_SIZE;
        let started = Instant::now();
        file.read_exact_at(&mut buffer, offset as u64)
            .with_context(|| format!("reading {} at {offset}", path.display()))?;
        summary
            .latencies_ns
            .push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
        if buffer[..] != expected[offset..offset + READ_SIZE] {
            bail!("wrong bytes in {} at {offset}", path.display());
        }
    }
    summary.finished_unix_ns = unix_ns();
    Ok(())
}

/// 7919 (a prime) unless it divides `blocks`, else the next number coprime with it.
fn coprime_stride(blocks: usize) -> usize {
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    (7919..).find(|s| gcd(*s, blocks.max(1)) == 1).unwrap_or(1)
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stride_visits_every_block_once() {
        for blocks in [1, 2, 256, 2048, 7919 * 2] {
            let stride = coprime_stride(blocks);
            let mut seen = vec![false; blocks];
            for i in 0..blocks {
                seen[(i * stride) % blocks] = true;
            }
            assert!(seen.iter().all(|s| *s), "{blocks} blocks");
        }
    }
}
