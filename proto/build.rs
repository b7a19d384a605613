//! Compiles the protobuf definitions with `protox`, a protobuf compiler
//! written in Rust that carries the well-known types
//! (`google/protobuf/*.proto`) itself. The build needs no system `protoc`
//! and no include directory from a Debian package: a machine with only the
//! Rust toolchain builds the workspace.
//!
//! `serde::Serialize` is derived for Ballast's own messages only (the CLI
//! prints them as JSON). The CSI messages embed well-known types
//! (`prost_types::Timestamp`, wrappers) that do not implement it.

const PROTOS: [&str; 3] = [
    "ballast/agent.proto",
    "ballast/controller.proto",
    "csi.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["."])?;
    tonic_prost_build::configure()
        .type_attribute(".ballast", "#[derive(serde::Serialize)]")
        .compile_fds(descriptors)?;
    Ok(())
}
