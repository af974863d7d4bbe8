//! An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/…`)
//! as a source of images and a place to write artifacts, for use without a
//! registry.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use stoker_format::Digest;

use crate::ConvertError;

#[derive(Clone, Debug)]
pub struct OciLayout {
    pub dir: PathBuf,
}

impl OciLayout {
    pub fn open(dir: &Path) -> Result<OciLayout, ConvertError> {
        let marker = dir.join("oci-layout");
        if !marker.is_file() {
            return Err(ConvertError::Source(format!(
                "{} is not an OCI image layout (no oci-layout file)",
                dir.display()
            )));
        }
        Ok(OciLayout {
            dir: dir.to_path_buf(),
        })
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, ConvertError> {
        let path = self.blob_path(digest);
        let bytes = fs::read(&path).map_err(|e| ConvertError::io(&path, e))?;
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(ConvertError::DigestMismatch {
                what: format!("blob {}", path.display()),
                expected: *digest,
                actual,
            });
        }
        Ok(bytes)
    }

    pub fn open_blob(&self, digest: &Digest) -> Result<Box<dyn Read + Send>, ConvertError> {
        let path = self.blob_path(digest);
        let file = fs::File::open(&path).map_err(|e| ConvertError::io(&path, e))?;
        Ok(Box::new(file))
    }

    /// Resolves `tag` (the `org.opencontainers.image.ref.name` annotation), or the
    /// only manifest when `tag` is `None`, to (descriptor media type, digest).
    pub fn resolve(&self, tag: Option<&str>) -> Result<(String, Digest), ConvertError> {
        let index = self.index_json()?;
        let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
        let candidates: Vec<&Value> = manifests
            .iter()
            .filter(|m| match tag {
                Some(tag) => m["annotations"]["org.opencontainers.image.ref.name"] == tag,
                None => m["artifactType"].is_null(),
            })
            .collect();
        let [found] = candidates.as_slice() else {
            return Err(ConvertError::Source(format!(
                "{}: {} manifests match {}",
                self.dir.display(),
                candidates.len(),
                tag.map_or("(no tag)".to_string(), |t| format!("tag {t:?}"))
            )));
        };
        let digest = found["digest"]
            .as_str()
            .ok_or_else(|| ConvertError::Source("index.json entry without a digest".into()))?;
        Ok((
            found["mediaType"].as_str().unwrap_or_default().to_string(),
            Digest::parse(digest)?,
        ))
    }

    /// Stores a blob by moving (or copying) a file into `blobs/sha256`.
    pub fn put_blob_file(&self, digest: &Digest, file: &Path) -> Result<(), ConvertError> {
        let dest = self.blob_path(digest);
        if dest.exists() {
            return Ok(());
        }
        if fs::rename(file, &dest).is_err() {
            fs::copy(file, &dest).map_err(|e| ConvertError::io(&dest, e))?;
        }
        Ok(())
    }

    pub fn put_blob(&self, bytes: &[u8]) -> Result<Digest, ConvertError> {
        let digest = Digest::of(bytes);
        let dest = self.blob_path(&digest);
        if !dest.exists() {
            let tmp = dest.with_extension("tmp");
            fs::write(&tmp, bytes).map_err(|e| ConvertError::io(&tmp, e))?;
            fs::rename(&tmp, &dest).map_err(|e| ConvertError::io(&dest, e))?;
        }
        Ok(digest)
    }

    /// Adds an artifact manifest to `index.json` (replacing an entry with the same digest).
    pub fn add_manifest(
        &self,
        bytes: &[u8],
        media_type: &str,
        artifact_type: &str,
    ) -> Result<Digest, ConvertError> {
        let digest = self.put_blob(bytes)?;
        let mut index = self.index_json()?;
        let entry = json!({
            "mediaType": media_type,
            "artifactType": artifact_type,
            "digest": digest.to_string(),
            "size": bytes.len(),
        });
        let manifests = index["manifests"]
            .as_array_mut()
            .ok_or_else(|| ConvertError::Source("index.json has no manifests array".into()))?;
        manifests.retain(|m| m["digest"] != digest.to_string());
        manifests.push(entry);
        let path = self.dir.join("index.json");
        let text =
            serde_json::to_vec_pretty(&index).map_err(|e| ConvertError::Internal(e.to_string()))?;
        fs::write(&path, text).map_err(|e| ConvertError::io(&path, e))?;
        Ok(digest)
    }

    /// Artifact manifests in `index.json` whose subject is `subject`.
    pub fn referrers(
        &self,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Vec<Digest>, ConvertError> {
        let index = self.index_json()?;
        let mut found = Vec::new();
        for m in index["manifests"].as_array().into_iter().flatten() {
            if m["artifactType"] != artifact_type {
                continue;
            }
            let Some(digest) = m["digest"].as_str().and_then(|d| Digest::parse(d).ok()) else {
                continue;
            };
            let manifest: Value = serde_json::from_slice(&self.read_blob(&digest)?)
                .map_err(|e| ConvertError::Source(format!("artifact manifest {digest}: {e}")))?;
            if manifest["subject"]["digest"] == subject.to_string() {
                found.push(digest);
            }
        }
        Ok(found)
    }

    fn index_json(&self) -> Result<Value, ConvertError> {
        let path = self.dir.join("index.json");
        let bytes = fs::read(&path).map_err(|e| ConvertError::io(&path, e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ConvertError::Source(format!("{}: {e}", path.display())))
    }
}
