//! The snapshotter's reading of containerd's labels and filters:
//! `LayerLabels::from_labels` (the CRI labels that say which image, manifest,
//! layer and chain ID a Prepare is for) and `filter::Filter::parse` (the
//! filters containerd sends to find remote snapshots by label).
//!
//! Input: the first line is a filter; every other line is a label `KEY=VALUE`.
//! Nothing may panic; a complete CRI label set is recognised exactly; and a
//! filter built by quoting any label's key and value parses and matches it.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use stoker_snapshotter::filter::{Filter, matches_any};
use stoker_snapshotter::remote::{
    IMAGE_REF_LABEL, LAYER_DIGEST_LABEL, MANIFEST_DIGEST_LABEL, SNAPSHOT_REF_LABEL,
};
use stoker_snapshotter::{LayerLabels, SnapshotKind, SnapshotRecord};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let filter_text = lines.next().unwrap_or_default();
    let labels: BTreeMap<String, String> = lines
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect();

    check_layer_labels(&labels);

    let record = SnapshotRecord {
        id: 1,
        name: labels.get(SNAPSHOT_REF_LABEL).cloned().unwrap_or_default(),
        parent: String::new(),
        kind: SnapshotKind::Committed,
        created_unix_nanos: 0,
        updated_unix_nanos: 0,
        labels: labels.clone(),
        size: 0,
        inodes: 0,
        remote: None,
    };
    if let Ok(filter) = Filter::parse(filter_text) {
        let _ = filter.matches(&record);
        let _ = matches_any(std::slice::from_ref(&filter), &record);
    }
    for (key, value) in &labels {
        let text = format!("labels.{}=={}", quote(key), quote(value));
        let filter = Filter::parse(&text)
            .unwrap_or_else(|e| panic!("quoted label filter {text:?} does not parse: {e}"));
        assert!(filter.matches(&record), "{text:?} does not match its label");
    }
});

/// The four CRI labels are all read, or the layer is not a remote candidate.
fn check_layer_labels(labels: &BTreeMap<String, String>) {
    let get = |key: &str| labels.get(key).filter(|v| !v.is_empty());
    match LayerLabels::from_labels(labels) {
        Some(layer) => {
            assert_eq!(Some(&layer.image_ref), get(IMAGE_REF_LABEL));
            assert_eq!(Some(&layer.manifest_digest), get(MANIFEST_DIGEST_LABEL));
            assert_eq!(Some(&layer.layer_digest), get(LAYER_DIGEST_LABEL));
            assert_eq!(Some(&layer.target), get(SNAPSHOT_REF_LABEL));
        }
        None => assert!(
            [
                IMAGE_REF_LABEL,
                MANIFEST_DIGEST_LABEL,
                LAYER_DIGEST_LABEL,
                SNAPSHOT_REF_LABEL
            ]
            .iter()
            .any(|key| get(key).is_none())
        ),
    }
}

/// containerd's quoting: double quotes, with `\` and `"` escaped.
fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}
