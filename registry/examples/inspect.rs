//! Resolves an image, lists its layers with their first bytes (read with ranged reads) and
//! the referrers of a given artifact type.
//!
//! ```text
//! cargo run -p stoker-registry --example inspect -- [--plain-http] HOST[:PORT]/REPO:TAG [ARTIFACT_TYPE]
//! ```
//!
//! Credentials come from `~/.docker/config.json`. Loopback registries without TLS work
//! without `--plain-http`.

use anyhow::{Context, bail};
use stoker_registry::{Digest, RegistryClient, RegistryConfig, parse_reference, select_platforms};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let plain_http = args.first().is_some_and(|a| a == "--plain-http");
    if plain_http {
        args.remove(0);
    }
    let Some(reference) = args.first().cloned() else {
        bail!("usage: inspect [--plain-http] HOST[:PORT]/REPO:TAG [ARTIFACT_TYPE]");
    };
    let artifact_type = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| stoker_format::artifact::ARTIFACT_TYPE.to_string());

    stoker_registry::install_crypto_provider();
    let client = RegistryClient::new(RegistryConfig {
        plain_http,
        ..RegistryConfig::default()
    })?;
    let repo = parse_reference(&reference)?;

    let mut manifest = client.fetch_manifest(&reference).await?;
    println!("{reference}: {} {}", manifest.media_type, manifest.digest);
    if manifest.is_index() {
        let index = manifest.image_index()?;
        let chosen = select_platforms(&index, &[])?;
        let first = chosen
            .first()
            .context("the index lists no image manifest")?;
        println!("  index; using the first platform: {:?}", first.platform());
        let by_digest = format!(
            "{}/{}@{}",
            repo.registry(),
            repo.repository(),
            first.digest()
        );
        manifest = client.fetch_manifest(&by_digest).await?;
    }

    for layer in manifest.image_manifest()?.layers() {
        let digest: Digest = layer.digest().to_string().parse()?;
        let head = client
            .read_range(&repo, &digest, 0..layer.size().min(16))
            .await?;
        println!(
            "  layer {digest} {:>12} bytes, starts with {}",
            layer.size(),
            hex(&head)
        );
    }

    let referrers = client
        .find_referrers(&repo, &manifest.digest, &artifact_type)
        .await?;
    println!("  {} referrer(s) of type {artifact_type}", referrers.len());
    for referrer in referrers {
        println!("    {} ({} bytes)", referrer.digest(), referrer.size());
    }
    let stats = client.stats();
    println!(
        "requests {}, retries {}, re-authentications {}",
        stats.requests(),
        stats.retries(),
        stats.reauthentications()
    );
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
