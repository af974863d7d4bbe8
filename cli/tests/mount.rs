//! `stoker mount` against a real registry and real FUSE: the mounted tree is
//! exactly what umoci unpacks, and a remount on the same cache fetches nothing.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use stoker_testkit::image::{
    StandardImageSizes, push_layout, standard_test_image_with, unpack_reference,
};
use stoker_testkit::registry::TestRegistry;
use stoker_testkit::tree::TreeSnapshot;

fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let path = path.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path.as_ref()))
}

fn start_mount(reference: &str, mountpoint: &Path, cache: &Path) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_stoker"))
        .args(["mount", "--plain-http", reference])
        .arg(mountpoint)
        .arg("--cache-dir")
        .arg(cache)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start stoker mount");
    assert!(
        stoker_testkit::wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
            is_mounted(mountpoint)
        }),
        "stoker mount did not mount {}",
        mountpoint.display()
    );
    child
}

fn stop_mount(mut child: Child, mountpoint: &Path) {
    // Signal through the kill command, as a user pressing Ctrl-C would.
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "stoker mount exited with {exit}");
    assert!(!is_mounted(mountpoint), "still mounted after SIGINT");
}

#[test]
fn mounted_image_matches_umoci_and_a_remount_is_warm() {
    let test = "mounted_image_matches_umoci_and_a_remount_is_warm";
    for tool in ["docker-registry", "skopeo", "umoci"] {
        if !stoker_testkit::require_tool(test, tool) {
            return;
        }
    }
    if !Path::new("/dev/fuse").exists() || !stoker_testkit::require_root(test) {
        eprintln!("SKIPPED: {test}: needs /dev/fuse and root");
        return;
    }
    let registry = TestRegistry::start().expect("registry");
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    standard_test_image_with(StandardImageSizes::SMALL)
        .write_layout(&layout, "v1")
        .unwrap();
    push_layout(&layout, "v1", &registry.host(), "mount/standard:v1").unwrap();
    let reference = format!("{}/mount/standard:v1", registry.host());
    let out = Command::new(env!("CARGO_BIN_EXE_stoker"))
        .args(["convert", "--plain-http", "--json", &reference])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let index_digest = report[0]["index_digest"].as_str().unwrap().to_string();

    let expected = TreeSnapshot::capture(
        &unpack_reference(&layout, "v1", &work.path().join("bundle")).unwrap(),
    )
    .unwrap();
    let mountpoint = work.path().join("mnt");
    let cache = work.path().join("cache");
    std::fs::create_dir(&mountpoint).unwrap();

    let child = start_mount(&reference, &mountpoint, &cache);
    let mounted = TreeSnapshot::capture(&mountpoint).expect("walk the mount");
    expected.assert_same(&mounted, 40);
    stop_mount(child, &mountpoint);

    // Remount on the same cache: reading every byte again fetches no chunk.
    registry.clear_requests();
    let child = start_mount(&reference, &mountpoint, &cache);
    let again = TreeSnapshot::capture(&mountpoint).expect("walk the mount again");
    expected.assert_same(&again, 40);
    stop_mount(child, &mountpoint);
    let index_hex = index_digest.trim_start_matches("sha256:");
    let data_gets: Vec<_> = registry
        .requests()
        .into_iter()
        .filter(|r| r.is_blob_get() && !r.path.contains(index_hex))
        .collect();
    assert!(
        data_gets.is_empty(),
        "a warm remount fetched chunks: {data_gets:?}"
    );
}
