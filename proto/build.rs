//! Compiles `proto/blixard.proto` with protox (pure Rust, no system protoc)
//! and generates tonic/madsim-tonic stubs from the descriptor set.
use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/blixard.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds_path = out.join("blixard_descriptor.bin");
    std::fs::write(&fds_path, fds.encode_to_vec())?;
    tonic_build::configure()
        .file_descriptor_set_path(&fds_path)
        .skip_protoc_run()
        .compile_protos(&[proto], &["proto"])?;
    Ok(())
}
