//! What sonde costs, read from the kernel: its CPU time and peak RSS from /proc, and the time
//! its eBPF programs ran (kernel.bpf_stats_enabled; run_time_ns in each program fd's fdinfo).

use std::path::Path;

/// Clock ticks per second for /proc/PID/stat times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may contain spaces) start at state (field 3).
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / TICKS_PER_SECOND
}

/// Peak resident set (VmHWM) in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Total (run_time_ns, run_cnt) over the eBPF programs a process holds open.
pub fn bpf_run_time(pid: u32) -> (u64, u64) {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut total = (0, 0);
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if !info.contains("prog_type:") {
            continue;
        }
        let field = |k: &str| {
            info.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0)
        };
        total.0 += field("run_time_ns:");
        total.1 += field("run_cnt:");
    }
    total
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
