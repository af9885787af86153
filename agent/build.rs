//! Builds the eBPF programs (ebpf/probes) for the BPF target with the nightly toolchain and
//! embeds them in the agent. `AYA_BUILD_SKIP=1` skips that step (for clippy on host code).
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/probes");
    println!("cargo:rerun-if-changed={root}/src");
    println!("cargo:rerun-if-changed=../ebpf/common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "sonde-probes",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
