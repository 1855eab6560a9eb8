//! Generates the prost types and the tonic client and server of the admin API from `proto/` at
//! the workspace root.
//!
//! protox parses the .proto files in Rust, so no `protoc` binary and no network are needed at
//! build time.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["bidsflux/v1/events.proto", "bidsflux/v1/state.proto", "bidsflux/v1/admin.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
