//! Options shared by every command that names an image: where it is and how
//! to reach the registry.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use stoker_convert::ImageStore;
use stoker_convert::layout::OciLayout;
use stoker_registry::{RegistryClient, RegistryConfig};

#[derive(Args, Clone, Debug)]
pub struct RegistryArgs {
    /// Talk plain HTTP to the registry (for registries on loopback).
    #[arg(long)]
    pub plain_http: bool,
    /// Registry user name; the password is read from standard input (--password-stdin).
    #[arg(long, requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the registry password from standard input.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// Extra CA certificates (PEM) to trust.
    #[arg(long)]
    pub ca_bundle: Option<PathBuf>,
    /// Platform of a multi-platform image, as os/arch[/variant].
    #[arg(long)]
    pub platform: Vec<String>,
}

impl RegistryArgs {
    pub fn client(&self) -> anyhow::Result<RegistryClient> {
        let mut config = RegistryConfig {
            plain_http: self.plain_http,
            ca_bundle: self.ca_bundle.clone(),
            ..RegistryConfig::default()
        };
        if let Some(user) = &self.username {
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("reading the password from standard input")?;
            config.basic_auth = Some((
                user.clone(),
                password.trim_end_matches(['\r', '\n']).to_string(),
            ));
        }
        Ok(RegistryClient::new(config)?)
    }

    /// Opens `image`: `oci:DIR[:TAG]` (or an existing directory) is an OCI
    /// layout; anything else is a registry reference. Returns the store and
    /// the tag or digest.
    pub fn open(&self, image: &str) -> anyhow::Result<(ImageStore, String)> {
        if let Some(rest) = image.strip_prefix("oci:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((dir, tag)) if !tag.contains('/') => (dir, tag),
                _ => (rest, ""),
            };
            let layout = OciLayout::open(dir.as_ref())?;
            return Ok((ImageStore::Layout(layout), tag.to_string()));
        }
        if std::path::Path::new(image).is_dir() {
            return Ok((
                ImageStore::Layout(OciLayout::open(image.as_ref())?),
                String::new(),
            ));
        }
        if image.is_empty() {
            bail!("no image named");
        }
        Ok(ImageStore::registry(self.client()?, image)?)
    }

    pub fn single_platform(&self) -> anyhow::Result<Option<&str>> {
        match self.platform.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one)),
            _ => bail!("name at most one --platform here"),
        }
    }
}
