//! `stoker plan TRACE… [--max-bytes N] [-o PLAN] [--push IMAGE]`: merges startup
//! traces of one image into a prefetch plan.
//!
//! Traces are the files the agent keeps under `<state_dir>/traces/<id>.trace`
//! (stoker-format's trace encoding). The plan orders chunks by the number of traces
//! that read them, then by their median first-access time, and stops at the byte
//! budget. With `--push` the plan is also attached to the image as an OCI artifact
//! (artifactType [`PLAN_ARTIFACT_TYPE`], subject: the image manifest whose Stoker
//! artifact has the plan's index), for use without Kubernetes.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use stoker_convert::ImageStore;
use stoker_format::artifact::{EMPTY_CONFIG_DIGEST, EMPTY_CONFIG_MEDIA_TYPE};
use stoker_format::{Digest, Plan, Trace};

use crate::convert_cmd::human;
use crate::image_args::RegistryArgs;

/// `artifactType` of a plan artifact.
pub const PLAN_ARTIFACT_TYPE: &str = "application/vnd.stoker.plan.v1";
/// Media type of the plan document (stoker-format's plan encoding, zstd inside).
pub const PLAN_MEDIA_TYPE: &str = "application/vnd.stoker.plan.v1+zstd";
/// Annotation on a plan artifact: the index the plan is bound to.
pub const ANNOTATION_PLAN_INDEX: &str = "dev.stoker.plan.index-digest";

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Trace files of one image (`<state_dir>/traces/<id>.trace` on a node).
    #[arg(required = true)]
    pub traces: Vec<PathBuf>,
    /// Byte budget (uncompressed chunk bytes), e.g. 2G, 512MiB or 1000000.
    #[arg(long, value_parser = parse_size)]
    pub max_bytes: Option<u64>,
    /// Write the plan to this file.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Attach the plan to this image (host[:port]/repo:tag or @digest) as an OCI artifact.
    #[arg(long, value_name = "IMAGE")]
    pub push: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What a plan holds and how it covers each trace.
#[derive(Debug, Serialize, PartialEq)]
pub struct PlanSummary {
    pub index_digest: String,
    pub chunks: u64,
    pub bytes: u64,
    pub max_bytes: Option<u64>,
    /// Size of the encoded plan document.
    pub encoded_bytes: u64,
    pub traces: Vec<TraceCoverage>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct TraceCoverage {
    pub file: String,
    pub container: String,
    pub chunks: u64,
    pub bytes: u64,
    /// Chunks this trace shares with at least one other trace.
    pub shared_chunks: u64,
    /// Chunks and bytes of this trace the plan holds.
    pub planned_chunks: u64,
    pub planned_bytes: u64,
    pub truncated: bool,
}

pub async fn run(args: PlanArgs) -> anyhow::Result<()> {
    let mut traces = Vec::with_capacity(args.traces.len());
    for path in &args.traces {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let trace = Trace::decode(&bytes).with_context(|| format!("{}", path.display()))?;
        traces.push(trace);
    }
    let plan = Plan::merge(&traces, args.max_bytes).context("merging the traces")?;
    let encoded = plan.encode().context("encoding the plan")?;
    let names: Vec<String> = args
        .traces
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let summary = summarize(&plan, &traces, &names, args.max_bytes, encoded.len() as u64);
    if let Some(output) = &args.output {
        std::fs::write(output, &encoded)
            .with_context(|| format!("writing {}", output.display()))?;
    }
    let pushed = match &args.push {
        Some(image) => Some(push(&args.registry, image, &plan, &encoded, &summary).await?),
        None => None,
    };
    if args.json {
        let mut value = serde_json::to_value(&summary)?;
        if let Some((artifact, subject)) = &pushed {
            value["artifact"] = artifact.to_string().into();
            value["subject"] = subject.to_string().into();
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print_summary(&summary);
        if let Some(output) = &args.output {
            println!("written to    {}", output.display());
        }
        if let Some((artifact, subject)) = &pushed {
            println!("pushed        {artifact} (subject {subject})");
        }
        if args.output.is_none() && pushed.is_none() {
            println!("(not written: pass -o FILE or --push IMAGE)");
        }
    }
    Ok(())
}

/// Per-trace coverage of `plan`.
pub fn summarize(
    plan: &Plan,
    traces: &[Trace],
    names: &[String],
    max_bytes: Option<u64>,
    encoded_bytes: u64,
) -> PlanSummary {
    let planned: HashSet<u32> = plan.chunks.iter().copied().collect();
    let mut length: HashMap<u32, u32> = HashMap::new();
    let mut seen_in: HashMap<u32, u32> = HashMap::new();
    let distinct: Vec<HashSet<u32>> = traces
        .iter()
        .map(|t| t.entries.iter().map(|e| e.chunk).collect())
        .collect();
    for (trace, chunks) in traces.iter().zip(&distinct) {
        for entry in &trace.entries {
            length.entry(entry.chunk).or_insert(entry.len);
        }
        for &chunk in chunks {
            *seen_in.entry(chunk).or_default() += 1;
        }
    }
    let bytes_of = |chunks: &mut dyn Iterator<Item = &u32>| -> u64 {
        chunks
            .map(|c| u64::from(length.get(c).copied().unwrap_or(0)))
            .sum()
    };
    let coverage = traces
        .iter()
        .zip(&distinct)
        .zip(names)
        .map(|((trace, chunks), name)| TraceCoverage {
            file: name.clone(),
            container: trace.container.clone(),
            chunks: chunks.len() as u64,
            bytes: bytes_of(&mut chunks.iter()),
            shared_chunks: chunks.iter().filter(|c| seen_in[c] > 1).count() as u64,
            planned_chunks: chunks.iter().filter(|c| planned.contains(c)).count() as u64,
            planned_bytes: bytes_of(&mut chunks.iter().filter(|c| planned.contains(c))),
            truncated: trace.truncated,
        })
        .collect();
    PlanSummary {
        index_digest: plan.index_digest.to_string(),
        chunks: plan.chunks.len() as u64,
        bytes: bytes_of(&mut plan.chunks.iter()),
        max_bytes,
        encoded_bytes,
        traces: coverage,
    }
}

fn print_summary(s: &PlanSummary) {
    let budget = s
        .max_bytes
        .map(|b| format!(" (budget {})", human(b)))
        .unwrap_or_default();
    println!("plan for index {}", s.index_digest);
    println!("  chunks        {} ({}{budget})", s.chunks, human(s.bytes));
    println!("  document      {} (encoded)", human(s.encoded_bytes));
    println!("  traces        {}", s.traces.len());
    for t in &s.traces {
        let percent = |part: u64, whole: u64| {
            if whole == 0 {
                100.0
            } else {
                part as f64 * 100.0 / whole as f64
            }
        };
        println!(
            "    {}{}: {} chunks ({}), {} shared with other traces, {:.0}% of its bytes in the plan{}",
            t.file,
            if t.container.is_empty() {
                String::new()
            } else {
                format!(" [{}]", t.container)
            },
            t.chunks,
            human(t.bytes),
            t.shared_chunks,
            percent(t.planned_bytes, t.bytes),
            if t.truncated {
                " (truncated trace)"
            } else {
                ""
            },
        );
    }
}

/// Attaches the plan to `image`. Returns the artifact digest and its subject.
pub(crate) async fn push(
    registry: &RegistryArgs,
    image: &str,
    plan: &Plan,
    encoded: &[u8],
    summary: &PlanSummary,
) -> anyhow::Result<(Digest, Digest)> {
    let (store, selector) = registry.open(image)?;
    let ImageStore::Registry { client, repository } = &store else {
        bail!("--push needs a registry image, not an OCI layout");
    };
    let subject = subject_manifest(&store, &selector, registry, &plan.index_digest).await?;
    let (plan_digest, plan_size) = client
        .push_blob(repository, encoded.to_vec().into())
        .await
        .context("uploading the plan")?;
    client
        .push_blob(repository, b"{}".to_vec().into())
        .await
        .context("uploading the empty config")?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": PLAN_ARTIFACT_TYPE,
        "config": {
            "mediaType": EMPTY_CONFIG_MEDIA_TYPE,
            "digest": EMPTY_CONFIG_DIGEST,
            "size": 2,
        },
        "layers": [{
            "mediaType": PLAN_MEDIA_TYPE,
            "digest": plan_digest.to_string(),
            "size": plan_size,
        }],
        "subject": {
            "mediaType": subject.media_type,
            "digest": subject.digest.to_string(),
            "size": subject.bytes.len(),
        },
        "annotations": {
            ANNOTATION_PLAN_INDEX: plan.index_digest.to_string(),
            "dev.stoker.plan.chunks": summary.chunks.to_string(),
            "dev.stoker.plan.bytes": summary.bytes.to_string(),
        },
    });
    let bytes = serde_json::to_vec(&manifest)?;
    let artifact = client
        .attach_referrer(repository, bytes.into(), &subject.digest)
        .await
        .context("pushing the plan artifact")?;
    Ok((artifact, subject.digest))
}

/// The image manifest (of the platforms selected) whose Stoker artifact has index
/// `index_digest`: the plan's subject.
async fn subject_manifest(
    store: &ImageStore,
    selector: &str,
    registry: &RegistryArgs,
    index_digest: &Digest,
) -> anyhow::Result<stoker_convert::source::Manifest> {
    for (platform, manifest) in store
        .platform_manifests(selector, &registry.platform)
        .await?
    {
        for artifact in store.referrers(&manifest.digest).await? {
            let found = stoker_convert::artifact::read_artifact(
                store,
                &manifest.digest,
                platform.clone(),
                &artifact,
            )
            .await?;
            if found.index_digest == *index_digest {
                return Ok(manifest);
            }
        }
    }
    bail!(
        "{} has no Stoker artifact with index {index_digest}: the traces are of another image (or it was converted again)",
        store.describe(selector)
    )
}

/// `1000`, `64K`/`64KiB`/`64KB`, `512M`, `2G`, `1T` (binary multiples).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 2G, 512MiB, 1000000)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use stoker_format::TraceEntry;

    fn trace(container: &str, chunks: &[(u32, u64)]) -> Trace {
        Trace {
            index_digest: Digest::of(b"index").to_string(),
            image: "r/app:1".into(),
            container: container.into(),
            files: vec!["/app/model".into()],
            entries: chunks
                .iter()
                .map(|&(chunk, micros)| TraceEntry {
                    chunk,
                    len: 1000,
                    file: 0,
                    file_offset: u64::from(chunk) * 1000,
                    micros,
                })
                .collect(),
            truncated: false,
        }
    }

    #[test]
    fn sizes_parse_with_binary_units_and_bad_ones_are_named() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("lots").unwrap_err().contains("lots"));
        assert!(parse_size("3X").unwrap_err().contains("unit"));
        assert!(
            parse_size("99999999999T")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[tokio::test]
    async fn three_traces_merge_into_a_plan_file_with_coverage() {
        let dir = tempfile::tempdir().unwrap();
        // Chunk 1 is read by all three starts, 2 by two, 3/4/5 by one each.
        let traces = [
            trace("a", &[(1, 10), (2, 20), (3, 30)]),
            trace("b", &[(2, 5), (1, 15), (4, 25)]),
            trace("c", &[(5, 1), (1, 2)]),
        ];
        let mut paths = Vec::new();
        for (i, t) in traces.iter().enumerate() {
            let path = dir.path().join(format!("t{i}.trace"));
            std::fs::write(&path, t.encode().unwrap()).unwrap();
            paths.push(path);
        }
        let output = dir.path().join("app.plan");
        run(PlanArgs {
            traces: paths.clone(),
            max_bytes: Some(3500),
            output: Some(output.clone()),
            push: None,
            registry: no_registry(),
            json: false,
        })
        .await
        .unwrap();
        let plan = Plan::decode(&std::fs::read(&output).unwrap()).unwrap();
        // 1 (three traces), 2 (two), then by median first access: 5 (at 1 µs); 4 (25 µs)
        // would take the plan past the 3500-byte budget.
        assert_eq!(plan.chunks, vec![1, 2, 5]);
        assert_eq!(plan.index_digest, Digest::of(b"index"));

        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        let summary = summarize(&plan, &traces, &names, Some(3500), 10);
        assert_eq!((summary.chunks, summary.bytes), (3, 3000));
        let shared: Vec<u64> = summary.traces.iter().map(|t| t.shared_chunks).collect();
        assert_eq!(shared, vec![2, 2, 1]);
        let planned: Vec<u64> = summary.traces.iter().map(|t| t.planned_chunks).collect();
        assert_eq!(planned, vec![2, 2, 2]);

        // Traces of another image, or a file that is no trace, are refused by name.
        let mut other = trace("d", &[(1, 1)]);
        other.index_digest = Digest::of(b"other").to_string();
        let other_path = dir.path().join("other.trace");
        std::fs::write(&other_path, other.encode().unwrap()).unwrap();
        let mixed = run(PlanArgs {
            traces: vec![paths[0].clone(), other_path],
            max_bytes: None,
            output: None,
            push: None,
            registry: no_registry(),
            json: true,
        })
        .await
        .unwrap_err();
        assert!(
            format!("{mixed:#}").contains("different images"),
            "{mixed:#}"
        );
        let junk_path = dir.path().join("junk.trace");
        std::fs::write(&junk_path, b"junk").unwrap();
        let junk = run(PlanArgs {
            traces: vec![junk_path],
            max_bytes: None,
            output: None,
            push: None,
            registry: no_registry(),
            json: false,
        })
        .await
        .unwrap_err();
        assert!(format!("{junk:#}").contains("junk.trace"), "{junk:#}");
    }

    fn no_registry() -> RegistryArgs {
        RegistryArgs {
            plain_http: true,
            username: None,
            password_stdin: false,
            ca_bundle: None,
            platform: Vec::new(),
        }
    }

    #[tokio::test]
    async fn push_attaches_the_plan_to_the_image_it_belongs_to() {
        for tool in ["docker-registry", "skopeo"] {
            if !stoker_testkit::require_tool(
                "push_attaches_the_plan_to_the_image_it_belongs_to",
                tool,
            ) {
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
        push_layout(&layout, "v1", &registry.host(), "cli/plan:v1").unwrap();
        let reference = format!("{}/cli/plan:v1", registry.host());
        let args = no_registry();
        let (store, selector) = args.open(&reference).unwrap();
        let reports = stoker_convert::convert(
            &store,
            &selector,
            &stoker_convert::ConvertOptions::default(),
        )
        .await
        .unwrap();
        let mut t = trace("ctr", &[(0, 1), (1, 2)]);
        t.index_digest = reports[0].index_digest.clone();
        let path = work.path().join("t.trace");
        std::fs::write(&path, t.encode().unwrap()).unwrap();

        run(PlanArgs {
            traces: vec![path.clone()],
            max_bytes: None,
            output: None,
            push: Some(reference.clone()),
            registry: no_registry(),
            json: true,
        })
        .await
        .unwrap();
        let ImageStore::Registry { client, repository } = &store else {
            unreachable!()
        };
        let subject = Digest::parse(&reports[0].source_manifest).unwrap();
        let referrers = client
            .find_referrers(repository, &subject, PLAN_ARTIFACT_TYPE)
            .await
            .unwrap();
        assert_eq!(referrers.len(), 1);
        let artifact = store
            .manifest(referrers[0].digest().as_ref())
            .await
            .unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&artifact.bytes).unwrap();
        assert_eq!(
            manifest["annotations"][ANNOTATION_PLAN_INDEX],
            reports[0].index_digest
        );
        let layer = Digest::parse(manifest["layers"][0]["digest"].as_str().unwrap()).unwrap();
        let plan = Plan::decode(&store.blob(&layer).await.unwrap()).unwrap();
        assert_eq!(plan.chunks, vec![0, 1]);

        // A plan of another image is refused before anything is pushed.
        let mut foreign = t.clone();
        foreign.index_digest = Digest::of(b"elsewhere").to_string();
        std::fs::write(&path, foreign.encode().unwrap()).unwrap();
        let refused = run(PlanArgs {
            traces: vec![path],
            max_bytes: None,
            output: None,
            push: Some(reference),
            registry: no_registry(),
            json: false,
        })
        .await
        .unwrap_err();
        assert!(
            format!("{refused:#}").contains("no Stoker artifact with index"),
            "{refused:#}"
        );
    }
}
