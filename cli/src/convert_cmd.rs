//! `stoker convert`.
//!
//! With `--plan PLAN` (or `--plan-from-registry`) the image is laid out by a
//! prefetch plan: the plan's chunks go to a hot blob, back to back in plan order
//! (docs/FORMAT.md, "Trace-ordered layout"). The new index has another digest, so
//! the plan is re-bound to it and written to `--plan-output` (default: the input
//! plan's path with `.laid-out` appended) and, for a registry image, attached to
//! the image as a plan artifact, as `stoker plan --push` does. Warm nodes from
//! the re-bound plan: the old one names the old index.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use stoker_convert::{ConvertOptions, ConvertReport, ImageStore};
use stoker_format::{Chunking, Digest, Plan};

use crate::image_args::RegistryArgs;
use crate::plan_cmd::{PLAN_ARTIFACT_TYPE, PLAN_MEDIA_TYPE, PlanSummary};

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
    /// Lay the image out by this prefetch plan (`stoker plan -o`): its chunks first,
    /// in plan order, in one hot blob. The plan must be bound to the index of the
    /// image's current Stoker artifact.
    #[arg(long, value_name = "PLAN", conflicts_with = "plan_from_registry")]
    pub plan: Option<PathBuf>,
    /// Like --plan, with the newest plan attached to the image (`stoker plan --push`).
    #[arg(long)]
    pub plan_from_registry: bool,
    /// Where to write the plan re-bound to the new index (default: PLAN.laid-out).
    #[arg(long, value_name = "FILE")]
    pub plan_output: Option<PathBuf>,
    /// Do not attach the re-bound plan to the image.
    #[arg(long)]
    pub no_push_plan: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Where the re-bound plan went.
#[derive(Debug, Default)]
struct PlanOutput {
    file: Option<PathBuf>,
    artifact: Option<Digest>,
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
        layout_plan: None,
    };
    let options = ConvertOptions {
        layout_plan: input_plan(&args, &store, &selector).await?,
        ..options
    };
    let reports = stoker_convert::convert(&store, &selector, &options).await?;
    let mut outputs = Vec::new();
    for report in &reports {
        outputs.push(match &report.layout_plan {
            Some(plan) => write_plan(&args, &store, &selector, report, plan).await?,
            None => PlanOutput::default(),
        });
    }
    if args.json {
        let mut values = Vec::new();
        for (report, output) in reports.iter().zip(&outputs) {
            let mut value = serde_json::to_value(report)?;
            if let Some(file) = &output.file {
                value["layout_plan_file"] = file.display().to_string().into();
            }
            if let Some(artifact) = &output.artifact {
                value["layout_plan_artifact"] = artifact.to_string().into();
            }
            values.push(value);
        }
        println!("{}", serde_json::to_string_pretty(&values)?);
    } else {
        for (report, output) in reports.iter().zip(&outputs) {
            print_report(report);
            print_plan_output(report, output);
        }
    }
    Ok(())
}

/// The plan to lay the image out by, if any.
async fn input_plan(
    args: &ConvertArgs,
    store: &ImageStore,
    selector: &str,
) -> anyhow::Result<Option<Plan>> {
    if let Some(path) = &args.plan {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let plan = Plan::decode(&bytes).with_context(|| format!("{}", path.display()))?;
        return Ok(Some(plan));
    }
    if !args.plan_from_registry {
        return Ok(None);
    }
    let ImageStore::Registry { client, repository } = store else {
        bail!("--plan-from-registry needs a registry image, not an OCI layout");
    };
    for (_, manifest) in store
        .platform_manifests(selector, &args.registry.platform)
        .await?
    {
        let referrers = client
            .find_referrers(repository, &manifest.digest, PLAN_ARTIFACT_TYPE)
            .await?;
        // The newest plan is listed last.
        let Some(newest) = referrers.last() else {
            continue;
        };
        let artifact = stoker_registry::parse_image_manifest(
            &store.manifest(newest.digest().as_ref()).await?.bytes,
        )?;
        let layer = artifact
            .layers()
            .iter()
            .find(|l| l.media_type().to_string() == PLAN_MEDIA_TYPE)
            .with_context(|| format!("plan artifact {} has no plan layer", newest.digest()))?;
        let bytes = store.blob(&Digest::parse(layer.digest().as_ref())?).await?;
        let plan =
            Plan::decode(&bytes).with_context(|| format!("plan artifact {}", newest.digest()))?;
        return Ok(Some(plan));
    }
    bail!(
        "{} has no plan attached (push one with `stoker plan TRACE… --push IMAGE`)",
        store.describe(selector)
    )
}

/// Writes the re-bound plan to a file and attaches it to the image.
async fn write_plan(
    args: &ConvertArgs,
    store: &ImageStore,
    selector: &str,
    report: &ConvertReport,
    plan: &Plan,
) -> anyhow::Result<PlanOutput> {
    let encoded = plan.encode().context("encoding the re-bound plan")?;
    let mut output = PlanOutput::default();
    let file = args.plan_output.clone().or_else(|| {
        args.plan.as_ref().map(|p| {
            let mut name = p.clone().into_os_string();
            name.push(".laid-out");
            PathBuf::from(name)
        })
    });
    if let Some(file) = file {
        std::fs::write(&file, &encoded).with_context(|| format!("writing {}", file.display()))?;
        output.file = Some(file);
    }
    if !args.no_push_plan && matches!(store, ImageStore::Registry { .. }) {
        let summary = PlanSummary {
            index_digest: plan.index_digest.to_string(),
            chunks: plan.chunks.len() as u64,
            bytes: report.hot_blob.as_ref().map_or(0, |h| h.uncompressed_bytes),
            max_bytes: None,
            encoded_bytes: encoded.len() as u64,
            traces: Vec::new(),
        };
        let image = store.describe(selector);
        let (artifact, _) =
            crate::plan_cmd::push(&args.registry, &image, plan, &encoded, &summary).await?;
        output.artifact = Some(artifact);
    }
    Ok(output)
}

fn print_plan_output(report: &ConvertReport, output: &PlanOutput) {
    let (Some(hot), Some(plan)) = (&report.hot_blob, &report.layout_plan) else {
        return;
    };
    println!(
        "  hot blob      {} ({} chunks of the plan, {}, in plan order)",
        hot.digest,
        hot.chunks,
        human(hot.size)
    );
    println!("  plan          re-bound to index {}", plan.index_digest);
    if let Some(file) = &output.file {
        println!("                written to {}", file.display());
    }
    if let Some(artifact) = &output.artifact {
        println!("                attached to the image as {artifact}");
    }
    if output.file.is_none() && output.artifact.is_none() {
        println!("                (not kept: pass --plan-output FILE)");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(source: &str) -> ConvertArgs {
        ConvertArgs {
            source: source.to_string(),
            registry: RegistryArgs {
                plain_http: true,
                username: None,
                password_stdin: false,
                ca_bundle: None,
                platform: Vec::new(),
            },
            chunking: ChunkingKind::Fixed,
            chunk_size: 64 << 10,
            zstd_level: 3,
            staging_dir: None,
            deny_setuid: false,
            deny_devices: false,
            plan: None,
            plan_from_registry: false,
            plan_output: None,
            no_push_plan: false,
            json: true,
        }
    }

    #[tokio::test]
    async fn convert_with_a_plan_writes_and_attaches_the_rebound_plan() {
        let test = "convert_with_a_plan_writes_and_attaches_the_rebound_plan";
        for tool in ["docker-registry", "skopeo"] {
            if !stoker_testkit::require_tool(test, tool) {
                return;
            }
        }
        stoker_registry::install_crypto_provider();
        use stoker_testkit::image::{StandardImageSizes, push_layout, standard_test_image_with};
        let registry = stoker_testkit::registry::TestRegistry::start().unwrap();
        let work = tempfile::tempdir().unwrap();
        let layout = work.path().join("layout");
        standard_test_image_with(StandardImageSizes::SMALL)
            .write_layout(&layout, "v1")
            .unwrap();
        push_layout(&layout, "v1", &registry.host(), "cli/layout:v1").unwrap();
        let reference = format!("{}/cli/layout:v1", registry.host());
        let (store, selector) = args(&reference).registry.open(&reference).unwrap();

        run(args(&reference)).await.unwrap();
        let normal = stoker_convert::find_artifact(&store, &selector, None)
            .await
            .unwrap();
        let normal_index = stoker_convert::load_index(&store, &normal).await.unwrap();
        let plan = Plan {
            index_digest: normal.index_digest,
            chunks: vec![40, 0, 17, 3],
        };
        let wanted: Vec<Digest> = plan
            .chunks
            .iter()
            .map(|&c| normal_index.chunk(c).unwrap().digest)
            .collect();
        let plan_path = work.path().join("app.plan");
        std::fs::write(&plan_path, plan.encode().unwrap()).unwrap();

        run(ConvertArgs {
            plan: Some(plan_path.clone()),
            ..args(&reference)
        })
        .await
        .unwrap();
        let laid_out = stoker_convert::find_artifact(&store, &selector, None)
            .await
            .unwrap();
        assert_ne!(laid_out.index_digest, normal.index_digest);
        let index = stoker_convert::load_index(&store, &laid_out).await.unwrap();
        // The re-bound plan, next to the input: the new index, the same chunks.
        let rebound =
            Plan::decode(&std::fs::read(work.path().join("app.plan.laid-out")).unwrap()).unwrap();
        assert_eq!(rebound.index_digest, laid_out.index_digest);
        let named: Vec<Digest> = rebound
            .chunks
            .iter()
            .map(|&c| index.chunk(c).unwrap().digest)
            .collect();
        assert_eq!(named, wanted);
        // ... and attached to the image.
        let ImageStore::Registry { client, repository } = &store else {
            unreachable!()
        };
        let referrers = client
            .find_referrers(repository, &laid_out.image_manifest, PLAN_ARTIFACT_TYPE)
            .await
            .unwrap();
        assert_eq!(referrers.len(), 1);

        // --plan-from-registry takes that plan: the same layout again.
        run(ConvertArgs {
            plan_from_registry: true,
            ..args(&reference)
        })
        .await
        .unwrap();
        let again = stoker_convert::find_artifact(&store, &selector, None)
            .await
            .unwrap();
        assert_eq!(again.index_digest, laid_out.index_digest);
    }
}
