//! `cfg(bpf_target_arch)`: where the syscall registers sit in `struct pt_regs` (see `exit.rs`).
fn main() {
    aya_build::emit_bpf_target_arch_cfg().expect("bpf_target_arch");
}
