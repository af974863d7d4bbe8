//! Generates the Rust code for the .proto files under `proto/`.
//!
//! protoc comes from `protoc-bin-vendored` so a fresh machine builds without
//! a system protoc; `PROTOC` overrides it, and /usr/bin/protoc is the
//! fallback on platforms the vendored crate does not cover.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/containerd/types/mount.proto",
    "proto/containerd/services/snapshots/v1/snapshots.proto",
    "proto/stoker/agent/v1/agent.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut includes = vec![PathBuf::from("proto")];
    if let Ok(vendored_include) = protoc_bin_vendored::include_path() {
        includes.push(vendored_include);
    }

    let protos: Vec<PathBuf> = PROTOS.iter().map(PathBuf::from).collect();
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_path());

    println!("cargo:rerun-if-env-changed=PROTOC");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        // Registry passwords and tokens: `Debug` is written by hand in lib.rs
        // and never shows them.
        .skip_debug([".stoker.agent.v1.RegistryCredential"])
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &protos, &includes)?;
    Ok(())
}

fn protoc_path() -> PathBuf {
    if let Some(explicit) = std::env::var_os("PROTOC") {
        return PathBuf::from(explicit);
    }
    protoc_bin_vendored::protoc_bin_path().unwrap_or_else(|_| PathBuf::from("/usr/bin/protoc"))
}
