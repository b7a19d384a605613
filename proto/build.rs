//! Compiles the protobuf definitions with the system `protoc` (Debian's
//! `protobuf-compiler`); nothing is fetched from the network.
//!
//! `serde::Serialize` is derived for Ballast's own messages only (the CLI
//! prints them as JSON). The CSI messages embed well-known types
//! (`prost_types::Timestamp`, wrappers) that do not implement it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=ballast");
    println!("cargo:rerun-if-changed=csi.proto");
    tonic_prost_build::configure()
        .type_attribute(".ballast", "#[derive(serde::Serialize)]")
        .compile_protos(
            &[
                "ballast/agent.proto",
                "ballast/controller.proto",
                "csi.proto",
            ],
            &["."],
        )?;
    Ok(())
}
