//! eBPF program run statistics (kernel.bpf_stats_enabled): how long and how often the programs a
//! process holds ran. The benchmark reads sonde's in-kernel cost from them; tests read which of
//! its programs ran at all.

use std::{collections::HashSet, path::Path, process::Command};

/// (prog_id, run_time_ns, run_cnt) of each eBPF program a process holds open (fdinfo).
fn programs_of(pid: u32) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).into_iter().flatten().flatten() {
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if !info.contains("prog_type:") {
            continue;
        }
        let field = |k: &str| {
            info.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0)
        };
        out.push((field("prog_id:"), field("run_time_ns:"), field("run_cnt:")));
    }
    out
}

/// Total (run_time_ns, run_cnt) over the eBPF programs a process holds open.
pub fn run_time(pid: u32) -> (u64, u64) {
    programs_of(pid).iter().fold((0, 0), |(ns, n), (_, t, c)| (ns + t, n + c))
}

/// How many times the programs `pid` holds whose name starts with `prefix` ran (names from
/// bpftool; the kernel keeps the first 15 bytes of a program's name).
pub fn runs_of(pid: u32, prefix: &str) -> u64 {
    let out = Command::new("bpftool").args(["--json", "prog", "show"]).output().expect("run bpftool");
    assert!(out.status.success(), "bpftool prog show: {}", String::from_utf8_lossy(&out.stderr));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let named: HashSet<u64> = all
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .filter_map(|p| p["id"].as_u64())
        .collect();
    programs_of(pid).iter().filter(|(id, _, _)| named.contains(id)).map(|(_, _, c)| c).sum()
}

/// Turns kernel BPF run-time statistics on for as long as the guard lives.
pub struct BpfStats(String);

impl BpfStats {
    pub fn enable() -> Self {
        let path = Path::new("/proc/sys/kernel/bpf_stats_enabled");
        let before = std::fs::read_to_string(path).unwrap_or_else(|_| "0".into()).trim().to_owned();
        std::fs::write(path, "1").expect("enable kernel.bpf_stats_enabled (needs root)");
        Self(before)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.0);
    }
}
