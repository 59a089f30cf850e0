//! Generates the gRPC code of every `.proto` file under `wallet/`, with the protoc binary that
//! the `protoc-bin-vendored` crate ships (no system package needed).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let files = [
        "wallet/common/v1/common.proto",
        "wallet/raft/v1/raft.proto",
        "wallet/auticuro/v1/auticuro.proto",
        "wallet/marker/v1/marker.proto",
        "wallet/query/v1/query.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptor = PathBuf::from(std::env::var("OUT_DIR")?).join("wallet_descriptor.bin");
    // Maps are BTreeMaps: a message then always encodes to the same bytes (a shard sends an
    // event in the same bytes to a rebuild as it did to the live projection).
    tonic_prost_build::configure()
        .btree_map(".")
        .file_descriptor_set_path(&descriptor)
        .compile_protos(&files, &["."])?;
    Ok(())
}
