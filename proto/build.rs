//! Compiles csi.proto in pure Rust (protox), so no system `protoc` is needed,
//! and generates prost messages plus tonic clients and servers from it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=csi.proto");
    let descriptors = protox::compile(["csi.proto"], ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Maps keyed by value make requests comparable and their order stable.
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}
