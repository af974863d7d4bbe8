//! Layout by trace (`stoker convert --plan`): warming a node from a prefetch plan
//! with the normal layout (chunks in layer and tar order) against the
//! trace-ordered layout (the plan's chunks back to back in one hot blob).

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use stoker_cache::ChunkCache;
use stoker_convert::{ConvertOptions, ImageStore};
use stoker_fetch::{FetchConfig, Fetcher, RegistrySource};
use stoker_format::{Digest, Index, Plan};
use stoker_registry::{RegistryClient, RegistryConfig};
use stoker_testkit::registry::TestRegistry;

use crate::images::{MlImageSize, ml_image};
use crate::report::{Section, mb};

/// A larger coalescing limit, to show what a hot blob allows.
const LARGE_RANGE: u64 = 32 << 20;

/// What warming one plan cost.
struct Warm {
    requests: u64,
    registry_gets: usize,
    bytes: u64,
    seconds: f64,
}

fn client() -> anyhow::Result<RegistryClient> {
    stoker_registry::install_crypto_provider();
    Ok(RegistryClient::new(RegistryConfig {
        plain_http: true,
        docker_config: None,
        ..RegistryConfig::default()
    })?)
}

async fn load_index(store: &ImageStore, digest: &str) -> anyhow::Result<Index> {
    let digest = Digest::parse(digest)?;
    Ok(Index::decode_verified(
        &store.blob(&digest).await?,
        &digest,
    )?)
}

/// About one chunk in ten, picked by a seeded hash (scattered over every layer),
/// in a scrambled order, as a startup trace would read them.
fn scattered_plan(index: &Index, index_digest: &str) -> anyhow::Result<Plan> {
    let mix = |c: u32| (c as u64 ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9) >> 32;
    let mut chunks: Vec<u32> = (0..index.chunk_count())
        .filter(|&c| mix(c) % 10 == 0)
        .collect();
    chunks.sort_by_key(|&c| mix(c.wrapping_add(1)));
    Ok(Plan {
        index_digest: Digest::parse(index_digest)?,
        chunks,
    })
}

/// Warms an empty cache from `plan` with a fetcher over the registry.
async fn warm(
    registry: &TestRegistry,
    store: &ImageStore,
    index: &Index,
    plan: &Plan,
    config: FetchConfig,
) -> anyhow::Result<Warm> {
    let ImageStore::Registry { repository, .. } = store else {
        anyhow::bail!("the layout bench needs a registry");
    };
    let cache_dir = tempfile::tempdir()?;
    let cache = ChunkCache::open(cache_dir.path(), 64 << 30)?;
    let source = Arc::new(RegistrySource::new(client()?, repository.clone()));
    let fetcher = Fetcher::new(source, cache, config);
    let wanted = plan
        .chunks
        .iter()
        .map(|&c| index.chunk(c).context("plan chunk outside the index"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    registry.clear_requests();
    let started = Instant::now();
    fetcher.prefetch(&wanted).await?;
    let seconds = started.elapsed().as_secs_f64();
    let stats = fetcher.stats();
    let (logged, _) = registry.wait_for_requests(std::time::Duration::from_secs(10), |r| {
        r.iter().filter(|r| r.is_blob_get()).count() as u64 >= stats.requests
    });
    Ok(Warm {
        requests: stats.requests,
        registry_gets: logged.iter().filter(|r| r.is_blob_get()).count(),
        bytes: stats.bytes_fetched,
        seconds,
    })
}

pub async fn run(size: MlImageSize) -> anyhow::Result<Section> {
    let work = tempfile::tempdir()?;
    let registry = TestRegistry::start().context("registry")?;
    let (image, total_bytes) = ml_image(size);
    eprintln!("bench layout: writing a {} image", mb(total_bytes));
    let layout = work.path().join("layout");
    image.write_layout(&layout, "v1")?;
    stoker_testkit::image::push_layout(&layout, "v1", &registry.host(), "bench/layout:v1")?;
    let reference = format!("{}/bench/layout:v1", registry.host());
    let (store, selector) = ImageStore::registry(client()?, &reference)?;
    let options = ConvertOptions {
        staging_dir: Some(work.path().to_path_buf()),
        ..ConvertOptions::default()
    };

    eprintln!("bench layout: converting (normal layout)");
    let started = Instant::now();
    let normal = stoker_convert::convert(&store, &selector, &options)
        .await?
        .remove(0);
    let normal_secs = started.elapsed().as_secs_f64();
    let normal_index = load_index(&store, &normal.index_digest).await?;
    let plan = scattered_plan(&normal_index, &normal.index_digest)?;
    let plan_bytes: u64 = plan
        .chunks
        .iter()
        .filter_map(|&c| normal_index.chunk(c))
        .map(|c| c.uncompressed_len as u64)
        .sum();

    eprintln!(
        "bench layout: converting (trace-ordered, {} plan chunks)",
        plan.chunks.len()
    );
    let started = Instant::now();
    let laid_out = stoker_convert::convert(
        &store,
        &selector,
        &ConvertOptions {
            layout_plan: Some(plan.clone()),
            ..options.clone()
        },
    )
    .await?
    .remove(0);
    let laid_out_secs = started.elapsed().as_secs_f64();
    let laid_out_index = load_index(&store, &laid_out.index_digest).await?;
    let rebound = laid_out
        .layout_plan
        .clone()
        .context("no re-bound plan in the report")?;

    eprintln!("bench layout: warming from the plan");
    let cold = warm(
        &registry,
        &store,
        &normal_index,
        &plan,
        FetchConfig::default(),
    )
    .await?;
    let hot = warm(
        &registry,
        &store,
        &laid_out_index,
        &rebound,
        FetchConfig::default(),
    )
    .await?;
    let hot_large_ranges = warm(
        &registry,
        &store,
        &laid_out_index,
        &rebound,
        FetchConfig {
            max_coalesce_bytes: LARGE_RANGE,
            ..FetchConfig::default()
        },
    )
    .await?;

    let mut section = Section::new(
        "Layout by trace (`stoker convert --plan`)",
        &format!(
            "A generated {} image (the ML-like image of the conversion section: small text files, \
             shared-library-like files, weights), fixed 1 MiB chunks, {} chunks in its index. The plan \
             holds {} of them ({}, about one in ten, picked by a seeded hash across all layers, in a \
             scrambled order, like a startup trace). The image is converted twice: normally, and laid \
             out by the plan. Each time an empty cache is warmed from the plan (the re-bound plan for \
             the laid-out image) with stoker-fetch's Fetcher::prefetch and its default coalescing \
             (ranges up to 4 MiB, gaps up to 64 KiB bridged, 10 prefetch requests in flight) over \
             Debian's docker-registry on loopback. Requests are the fetcher's ranged reads; the \
             registry's access log agrees.",
            mb(total_bytes),
            normal_index.chunk_count(),
            plan.chunks.len(),
            mb(plan_bytes),
        ),
        &[
            "layout",
            "convert time",
            "ranged requests",
            "registry blob GETs",
            "bytes fetched",
            "warm time",
        ],
    );
    for (name, secs, warm) in [
        ("normal (layer, tar order)", normal_secs, &cold),
        ("trace-ordered (hot blob)", laid_out_secs, &hot),
    ] {
        section.row(vec![
            name.into(),
            format!("{secs:.2} s"),
            warm.requests.to_string(),
            warm.registry_gets.to_string(),
            mb(warm.bytes),
            format!("{:.3} s", warm.seconds),
        ]);
    }
    section.row(vec![
        "ratio normal / trace-ordered".into(),
        "-".into(),
        format!("{:.1}×", cold.requests as f64 / hot.requests.max(1) as f64),
        format!(
            "{:.1}×",
            cold.registry_gets as f64 / hot.registry_gets.max(1) as f64
        ),
        format!("{:.2}×", cold.bytes as f64 / hot.bytes.max(1) as f64),
        format!("{:.2}×", cold.seconds / hot.seconds.max(1e-9)),
    ]);
    section.row(vec![
        format!(
            "trace-ordered, ranges up to {} MiB (not the default)",
            LARGE_RANGE >> 20
        ),
        "-".into(),
        hot_large_ranges.requests.to_string(),
        hot_large_ranges.registry_gets.to_string(),
        mb(hot_large_ranges.bytes),
        format!("{:.3} s", hot_large_ranges.seconds),
    ]);
    section.note(
        "The normal layout bridges gaps between nearby small chunks, so it downloads chunks the \
         plan does not want; the trace-ordered layout reads exactly the hot blob, in ranges of at \
         most 4 MiB. Loopback hides latency: on a real network each request costs a round trip \
         (and more for a registry behind a CDN), so the request count matters more than the time \
         here.",
    );
    Ok(section)
}
