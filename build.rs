//! Generates the gRPC code for `proto/imaged/v1/imaged.proto`, the central repository's
//! `proto/imagerepo/v1/imagerepo.proto` (and the standard
//! `google.longrunning.Operations` service it returns operations of) with protox, a pure-Rust
//! protobuf compiler, so building needs no `protoc` binary.
//!
//! `google.rpc` messages come from `tonic-types` (which also encodes error details) and the
//! well-known types from `prost-types`; `google.api` and `google.longrunning` are generated here
//! from the wire-compatible definitions under `proto/google`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = [
        "proto/imaged/v1/imaged.proto",
        "proto/imagerepo/v1/imagerepo.proto",
        "proto/google/longrunning/operations.proto",
        "proto/google/rpc/error_details.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("imaged_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .extern_path(".google.rpc", "::tonic_types::pb")
        .compile_fds(fds)?;
    Ok(())
}
