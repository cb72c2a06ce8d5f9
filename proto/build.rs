//! Compiles the .proto files with protox (a pure-Rust protobuf compiler, so no system `protoc`) and
//! generates prost messages + tonic services. Also writes the file descriptor set that gRPC server
//! reflection serves.

use prost::Message;

const PROTOS: &[&str] = &[
    "weft/v1/common.proto",
    "weft/v1/publisher.proto",
    "weft/v1/subscriber.proto",
    "weft/v1/topic_admin.proto",
    "weft/v1/cluster.proto",
    "weft/v1/metadata.proto",
    "weft/internal/v1/raft.proto",
    "weft/internal/v1/forward.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let file_descriptors = protox::compile(PROTOS, ["proto"])?;

    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("weft_descriptor.bin"),
        file_descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        // Record payloads become `bytes::Bytes`, so they travel from the socket to the disk uncopied.
        .bytes(".")
        .compile_fds(file_descriptors)?;
    Ok(())
}
