//! Generates the protobuf and gRPC code from `proto/` with a vendored `protoc`, so a fresh
//! machine needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment yet.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&["proto/shardwise.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/shardwise.proto");
    Ok(())
}
