//! The `stoker` binary end to end against a real registry.

use std::process::Command;

use stoker_testkit::image::{StandardImageSizes, push_layout, standard_test_image_with};
use stoker_testkit::registry::TestRegistry;

fn stoker(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_stoker"))
        .args(args)
        .output()
        .expect("run stoker");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn convert_inspect_and_ls_through_the_registry() {
    for tool in ["docker-registry", "skopeo"] {
        if !stoker_testkit::require_tool("convert_inspect_and_ls_through_the_registry", tool) {
            return;
        }
    }
    let registry = TestRegistry::start().expect("registry");
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    standard_test_image_with(StandardImageSizes::SMALL)
        .write_layout(&layout, "v1")
        .unwrap();
    push_layout(&layout, "v1", &registry.host(), "cli/standard:v1").unwrap();
    let reference = format!("{}/cli/standard:v1", registry.host());

    // Before conversion there is nothing to inspect, and the error says so.
    let (ok, _, err) = stoker(&["inspect", "--plain-http", &reference]);
    assert!(!ok);
    assert!(err.contains("no Stoker artifact found"), "{err}");

    let (ok, out, err) = stoker(&["convert", "--plain-http", "--json", &reference]);
    assert!(ok, "convert failed: {err}");
    let reports: serde_json::Value = serde_json::from_str(&out).expect("json");
    let artifact = reports[0]["artifact"].as_str().unwrap().to_string();

    let (ok, out, err) = stoker(&["inspect", "--plain-http", "--json", &reference]);
    assert!(ok, "inspect failed: {err}");
    let inspected: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(inspected["artifact"], artifact.as_str());
    assert_eq!(
        inspected["summary"]["regular_files"],
        reports[0]["summary"]["regular_files"]
    );

    let (ok, out, err) = stoker(&["ls", "--plain-http", &reference, "/bin"]);
    assert!(ok, "ls failed: {err}");
    let server = out
        .lines()
        .find(|l| l.ends_with(" server"))
        .unwrap_or_else(|| panic!("no bin/server in:\n{out}"));
    assert!(server.starts_with("-4755"), "setuid bit shown: {server}");

    let (ok, _, err) = stoker(&["ls", "--plain-http", &reference, "/no/such/dir"]);
    assert!(!ok);
    assert!(err.contains("no such file or directory"), "{err}");

    // Plain-text summary names what the brief asks for.
    let (ok, out, err) = stoker(&["convert", "--plain-http", &reference]);
    assert!(ok, "{err}");
    for word in ["files", "chunks", "duplicates", "index", "blobs"] {
        assert!(out.contains(word), "summary lacks {word}:\n{out}");
    }
}

#[test]
fn convert_works_on_an_oci_layout_without_a_registry() {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    standard_test_image_with(StandardImageSizes::SMALL)
        .write_layout(&layout, "v1")
        .unwrap();
    let source = format!("oci:{}:v1", layout.display());
    let (ok, _, err) = stoker(&[
        "convert",
        "--chunking",
        "cdc",
        "--chunk-size",
        "65536",
        &source,
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = stoker(&["ls", &source, "/etc"]);
    assert!(ok, "{err}");
    assert!(out.contains("hello.txt"), "{out}");
    let (ok, _, err) = stoker(&["convert", "--chunk-size", "10", &source]);
    assert!(!ok);
    assert!(err.contains("chunk size"), "{err}");
}
