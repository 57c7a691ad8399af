//! Compiles `proto/trustbind/agent/v1/agent.proto` with `protox` (a pure-Rust
//! protobuf compiler), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/trustbind/agent/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        // Prost's codec, wiping pushed channel keys once encoded (T-84).
        .codec_path("crate::codec::WipingCodec")
        .compile_fds(fds)?;
    Ok(())
}
