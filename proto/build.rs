//! Generates the prost/tonic code for the `.proto` files under `schema/`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "schema/parvis/v1/common.proto",
        "schema/parvis/v1/host.proto",
        "schema/parvis/v1/vm.proto",
        "schema/parvis/v1/console.proto",
        "schema/parvis/v1/disk.proto",
        "schema/parvis/v1/network.proto",
        "schema/parvis/worker/v1/worker.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    let mut config = prost_build::Config::new();
    // Debian's protoc when PROTOC names it; otherwise the vendored one, so a fresh machine
    // (or a Windows one) needs nothing installed.
    let protoc = match std::env::var_os("PROTOC") {
        Some(p) => std::path::PathBuf::from(p),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    config.protoc_executable(protoc);
    config.bytes(["."]);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_with_config(config, &files, &["schema"])?;
    Ok(())
}
