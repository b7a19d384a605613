//! Compiles the protobuf definitions with the system `protoc` (Debian's
//! `protobuf-compiler`); nothing is fetched from the network.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=ballast");
    tonic_prost_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_protos(&["ballast/agent.proto", "ballast/controller.proto"], &["."])?;
    Ok(())
}
