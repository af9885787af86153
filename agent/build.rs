//! Builds the eBPF programs (ebpf/probes) for the BPF target with the nightly toolchain and
//! embeds them in the agent. `AYA_BUILD_SKIP=1` skips that step (for clippy on host code); the
//! agent then says at run time that it was built without its programs.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/probes");
    println!("cargo:rerun-if-changed={root}/src");
    println!("cargo:rerun-if-changed=../ebpf/common/src");
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("sonde-probes");
        std::fs::write(out, b"")?;
    }
    // aya-build runs `cargo build --package sonde-probes` in the current directory; the probes are
    // their own workspace (BPF target, panic=abort), so build from there.
    std::env::set_current_dir(root)?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "sonde-probes", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
