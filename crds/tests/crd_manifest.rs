//! The committed CRD manifest must be what `crdgen` generates now.

use std::path::Path;

#[test]
fn committed_crd_manifest_is_up_to_date() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(stoker_crds::CRD_MANIFEST_PATH);
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; run `cargo run -p stoker-crds --bin crdgen`",
            path.display()
        )
    });
    let generated = stoker_crds::crd_yaml().expect("CRD serializes");
    assert!(
        committed == generated,
        "{} is stale: run `cargo run -p stoker-crds --bin crdgen` and commit the result",
        path.display()
    );
}

#[test]
fn crd_has_status_subresource_and_printer_columns() {
    use kube::CustomResourceExt;
    let crd = stoker_crds::ImagePrefetch::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("imageprefetches.stoker.dev")
    );
    let version = &crd.spec.versions[0];
    assert!(
        version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some()
    );
    let columns: Vec<&str> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        ["Workload", "Images", "Hot", "Warm", "Phase", "Age"]
    );
}
