//! Writes the ImagePrefetch CRD to `manifests/crds/imageprefetch.yaml` (or to
//! stdout with `--stdout`).

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let yaml = stoker_crds::crd_yaml()?;
    if std::env::args().any(|a| a == "--stdout") {
        print!("{yaml}");
        return Ok(());
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(stoker_crds::CRD_MANIFEST_PATH);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, yaml)?;
    println!("wrote {}", path.display());
    Ok(())
}
