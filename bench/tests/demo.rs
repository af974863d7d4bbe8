//! `make demo` in a reduced form, so that it cannot rot: the demo's own code
//! (bench/src/demo.rs) on a tiny generated image, with a real registry, containerd
//! instances and `stoker-agent` processes. It checks what the demo shows — all three
//! starts print the right output, the lazy start fetches fewer bytes than the full
//! pull, the warmed start fetches no more than the lazy one — and no timings.
//!
//! Needs root, /dev/fuse, containerd, runc, docker-registry, skopeo, and the
//! `stoker-agent` binary built in the same profile (`cargo test --workspace` builds it).

// The demo is part of the `stoker-bench` binary; its modules are compiled in here.
#![allow(dead_code)]
#[path = "../src/demo.rs"]
mod demo;
#[path = "../src/images.rs"]
mod images;
#[path = "../src/report.rs"]
mod report;

use images::MlImageSize;

const TINY: MlImageSize = MlImageSize {
    small_files: 90,
    libraries: 6,
    weight_files: 1,
    weight_file_bytes: 4 << 20,
};

fn can_run(test: &str) -> bool {
    if !stoker_testkit::require_root(test) {
        return false;
    }
    if !std::path::Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED: {test}: /dev/fuse is absent");
        return false;
    }
    [
        "containerd",
        "ctr",
        "runc",
        "docker-registry",
        "skopeo",
        "ldd",
    ]
    .iter()
    .all(|tool| stoker_testkit::require_tool(test, tool))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_starts_a_tiny_image_three_ways() {
    if !can_run("the_demo_starts_a_tiny_image_three_ways") {
        return;
    }
    stoker_registry::install_crypto_provider();
    let result = demo::measure(TINY).await.expect("demo");
    let expected = format!("{}\n", demo::READY_LINE);
    for run in result.runs() {
        assert_eq!(run.output, expected, "{}", run.name);
    }
    assert!(result.plan_chunks > 0);
    assert!(
        result.lazy.bytes_during < result.full.bytes_during,
        "lazy fetched {} bytes, the full pull {}",
        result.lazy.bytes_during,
        result.full.bytes_during
    );
    assert!(result.warm.bytes_before > 0, "the plan warmed the node");
    assert!(
        result.warm.bytes_during < result.lazy.bytes_during,
        "warmed start fetched {} bytes, the lazy one {}",
        result.warm.bytes_during,
        result.lazy.bytes_during
    );
    let table = demo::table(&result).markdown();
    eprintln!("{table}");
    assert_eq!(
        result.local.bytes_during, 0,
        "the local start fetched nothing"
    );
    for name in ["full pull", "local", "stoker lazy", "stoker warmed"] {
        assert!(table.contains(name), "{table}");
    }
}
