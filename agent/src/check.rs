//! `sonde check`: what this host offers sonde, each finding with what it means for tracing.

use std::{path::Path, sync::Arc};

use crate::{
    capture::{
        Capture,
        loader::{CaptureOptions, TlsScope},
        tracefs,
    },
    config::AgentConfig,
    discovery::{Discovery, tls},
    stats::Stats,
    trace::{resource::Resource, span::AttrValue},
};

/// A process the configuration selects, with the resource `sonde run` would give it.
pub type Selected = (u32, Arc<Resource>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Works without it, with less.
    Degraded,
    /// sonde cannot run.
    Fatal,
}

pub struct Finding {
    pub item: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

fn finding(item: &'static str, verdict: Verdict, detail: impl Into<String>) -> Finding {
    Finding { item, verdict, detail: detail.into() }
}

/// Effective capabilities of this process (CapEff in /proc/self/status).
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapEff:").map(|v| u64::from_str_radix(v.trim(), 16).unwrap_or(0)))
        })
        .unwrap_or(0)
}

const CAPS: [(u32, &str, &str); 5] = [
    (39, "CAP_BPF", "load eBPF programs and create maps"),
    (38, "CAP_PERFMON", "attach tracepoints and uprobes, read kernel memory from eBPF"),
    (19, "CAP_SYS_PTRACE", "read /proc/PID/{exe,environ,fd} of other users' processes"),
    (2, "CAP_DAC_READ_SEARCH", "read /proc/PID/net/tcp and fd links of any process"),
    (21, "CAP_SYS_ADMIN", "mount tracefs when it is missing; older kernels need it for BPF"),
];

/// The capabilities loading and attaching sonde's programs needs that this process lacks
/// (CAP_SYS_ADMIN stands in for both), for error messages that name them.
pub fn missing_tracing_capabilities() -> Vec<&'static str> {
    let eff = effective_caps();
    if eff & (1 << 21) != 0 {
        return Vec::new();
    }
    CAPS.iter()
        .filter(|(bit, name, _)| matches!(*name, "CAP_BPF" | "CAP_PERFMON") && eff & (1 << bit) == 0)
        .map(|c| c.1)
        .collect()
}

/// The processes `cfg` selects, resolved as `sonde run` resolves them: with this node's pods
/// when a Kubernetes API is configured (the first list is awaited, bounded). The finding says
/// what the API gave.
pub fn select(cfg: AgentConfig) -> (Option<Finding>, Vec<Selected>) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return (Some(finding("kubernetes", Verdict::Degraded, format!("no runtime: {e}"))), Vec::new()),
    };
    let (pods, k8s_finding) = runtime.block_on(async {
        match crate::k8s::start(&cfg.kubernetes, Arc::new(Stats::default())).await {
            Ok(None) => (None, None),
            Ok(Some(cache)) => {
                let listed = crate::k8s::wait_for_first_list(&cache).await;
                let node = &cfg.kubernetes.node_name;
                let f = if listed {
                    finding("kubernetes", Verdict::Ok, format!("{} pods on node {node} listed by the API", cache.len()))
                } else {
                    finding(
                        "kubernetes",
                        Verdict::Degraded,
                        format!(
                            "no pod list for node {node} within {:?}: pod metadata and k8s_* selectors unavailable",
                            crate::k8s::FIRST_POD_LIST_WAIT
                        ),
                    )
                };
                (Some(cache), Some(f))
            }
            Err(e) => (None, Some(finding("kubernetes", Verdict::Degraded, format!("{e:#}")))),
        }
    });
    let selected = Discovery::new(cfg.selectors, cfg.excludes, cfg.resource_attributes, cfg.service_name)
        .with_kubernetes(pods, cfg.kubernetes)
        .selected();
    (k8s_finding, selected)
}

/// Where a selected process runs and what it is named: its service, and its container and pod
/// attributes as they will be exported.
fn placement_finding(pid: u32, resource: &Resource) -> Finding {
    let text = |v: &AttrValue| match v {
        AttrValue::Str(s) => s.to_string(),
        AttrValue::Int(i) => i.to_string(),
        AttrValue::Bool(b) => b.to_string(),
    };
    let exe = resource
        .attributes
        .iter()
        .find(|(k, _)| k == "process.executable.path")
        .map(|(_, v)| text(v))
        .unwrap_or_default();
    let placement: Vec<String> = resource
        .attributes
        .iter()
        .filter(|(k, _)| k.starts_with("k8s.") || k.starts_with("container.") || k.starts_with("service.namespace"))
        .map(|(k, v)| format!("{k}={}", text(v)))
        .collect();
    let place = if placement.is_empty() { "not in a container".to_owned() } else { placement.join(" ") };
    finding("process", Verdict::Ok, format!("pid {pid} ({exe}): service.name={} {place}", resource.service_name))
}

/// Host checks, what the Kubernetes API gave, then per selected process where it runs and how
/// its TLS is traced.
pub fn run_checks(selected: &[Selected], kubernetes: Option<Finding>) -> Vec<Finding> {
    let mut out = Vec::new();
    let caps = effective_caps();
    for (bit, name, why) in CAPS {
        let has = caps & (1u64 << bit) != 0;
        let verdict = match (has, name) {
            (true, _) => Verdict::Ok,
            (false, "CAP_BPF" | "CAP_PERFMON") => Verdict::Fatal,
            _ => Verdict::Degraded,
        };
        out.push(finding(
            name,
            verdict,
            if has { format!("present: {why}") } else { format!("missing: cannot {why}; run as root or add it") },
        ));
    }

    out.push(kernel_finding());

    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    out.push(finding(
        "BTF",
        if btf { Verdict::Ok } else { Verdict::Degraded },
        if btf {
            "present (/sys/kernel/btf/vmlinux); sonde does not need it: it reads only stable tracepoint and syscall ABI"
        } else {
            "absent; not needed: sonde reads only stable tracepoint and syscall ABI"
        },
    ));

    match tracefs::ensure_mounted() {
        Ok(()) => out.push(finding("tracefs", Verdict::Ok, format!("mounted at {}", tracefs::TRACEFS))),
        Err(e) => out.push(finding("tracefs", Verdict::Fatal, e)),
    }
    let events = Path::new(tracefs::TRACEFS).join("events");
    for (tp, why) in [
        ("syscalls/sys_enter_read", "syscall tracepoints carry all plaintext traffic"),
        ("task/task_newtask", "children of traced processes are traced from their first syscall"),
        ("sock/inet_sock_set_state", "a connecting socket's own address, to join traces on this host"),
    ] {
        let ok = events.join(tp).is_dir();
        out.push(finding(
            "tracepoints",
            if ok { Verdict::Ok } else { Verdict::Fatal },
            format!(
                "{tp}: {} ({why})",
                if ok { "present" } else { "missing: the kernel needs CONFIG_FTRACE_SYSCALLS" }
            ),
        ));
    }
    let uprobes = Path::new("/sys/bus/event_source/devices/uprobe").exists();
    out.push(finding(
        "uprobes",
        if uprobes { Verdict::Ok } else { Verdict::Degraded },
        if uprobes {
            "available: TLS plaintext can be captured at the OpenSSL boundary"
        } else {
            "unavailable: TLS traffic cannot be decrypted"
        },
    ));
    let kprobes = Path::new("/sys/bus/event_source/devices/kprobe").exists();
    out.push(finding(
        "kprobes",
        Verdict::Ok,
        if kprobes { "available (not used: sonde needs no kprobes)" } else { "absent (fine: sonde needs no kprobes)" },
    ));

    let fentry = aya::sys::is_program_supported(aya::programs::ProgramType::Tracing).unwrap_or(false);
    out.push(finding(
        "fentry",
        Verdict::Ok,
        if fentry {
            "available (not used: sonde needs no fentry/fexit)"
        } else {
            "absent (fine: sonde needs no fentry/fexit)"
        },
    ));

    // The definitive test: load and attach sonde's own programs, tracing nothing.
    match Capture::load(CaptureOptions {
        capture_bytes: 256,
        ring_buffer_bytes: 1 << 16,
        wakeup_bytes: 1 << 12,
        inject_http: None,
        floor: false,
        syscall_hooks: Default::default(),
        log_capture_bytes: 0,
        log_watch_opens: false,
    }) {
        Ok(mut c) => {
            out.push(finding(
                "BPF + ring buffer",
                Verdict::Ok,
                format!(
                    "sonde's {} programs load and attach; ring buffer created; {} iovecs read per readv/writev/recvmsg/sendmsg{}",
                    c.attached,
                    c.iovecs_per_call,
                    if c.iovecs_per_call < sonde_common::MAX_IOVECS {
                        " (the compact exit program: the verifiers of 5.10 and 6.1 refuse the full walk, so kernels before 6.12 do not try it)"
                    } else {
                        ""
                    }
                ),
            ));
            out.push(match c.check_injection() {
                Ok(cgroup) => finding(
                    "traceparent inject",
                    Verdict::Ok,
                    format!(
                        "available (opt-in, propagation.inject_http): sockops + sk_msg load; sockops attach to the cgroup v2 root {} (needs CAP_NET_ADMIN; in a container mount the host's /sys/fs/cgroup)",
                        cgroup.display()
                    ),
                ),
                Err(e) => finding("traceparent inject", Verdict::Degraded, format!("unavailable: {e}")),
            });
            out.extend(kubernetes);
            for (pid, resource) in selected {
                out.push(placement_finding(*pid, resource));
                out.push(tls_finding(&mut c, *pid));
            }
        }
        Err(e) => out.push(finding("BPF + ring buffer", Verdict::Fatal, e.to_string())),
    }
    out
}

/// The oldest kernel sonde's programs need: BPF ring buffers, `bpf_ringbuf_query` and
/// CAP_BPF/CAP_PERFMON came in 5.8 (mmapable arrays and `bpf_probe_read_user` in 5.5).
pub const MIN_KERNEL: (u32, u32) = (5, 8);

/// The running kernel's release, and whether it is new enough.
fn kernel_finding() -> Finding {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let (min_major, min_minor) = MIN_KERNEL;
    match kernel_version(&release) {
        Some(v) if v >= MIN_KERNEL => {
            finding("kernel", Verdict::Ok, format!("Linux {release} (sonde needs {min_major}.{min_minor} or newer)"))
        }
        Some(_) => finding(
            "kernel",
            Verdict::Fatal,
            format!("Linux {release} is too old: sonde needs {min_major}.{min_minor} or newer (BPF ring buffer)"),
        ),
        None => finding(
            "kernel",
            Verdict::Degraded,
            format!("release {release:?} not understood; sonde needs {min_major}.{min_minor}+"),
        ),
    }
}

/// (major, minor) of the running kernel, when its release is understood.
pub(crate) fn running_kernel() -> Option<(u32, u32)> {
    kernel_version(std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?.trim())
}

/// (major, minor) of a kernel release such as `6.1.0-50-amd64` or `5.10.223`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Which TLS library a selected process uses and whether sonde can trace it (the uprobes are
/// attached for real, then detached when the check ends).
fn tls_finding(capture: &mut Capture, pid: u32) -> Finding {
    let exe = crate::discovery::procfs::exe_path(pid).unwrap_or_default();
    let mut traced = Vec::new();
    for c in tls::candidates(pid) {
        if let Ok(links) = capture.attach_tls(&c.path, TlsScope::Process(pid)) {
            traced.push(c.describe(&links.symbols));
            capture.detach_tls(links);
        }
    }
    let detail = match (traced.is_empty(), tls::unsupported_stack(pid)) {
        (false, _) => format!("pid {pid} ({exe}): TLS traced through {}", traced.join("; ")),
        (true, Some(stack)) => format!("pid {pid} ({exe}): TLS by {stack}; plaintext traffic is traced"),
        (true, None) => format!("pid {pid} ({exe}): no TLS library loaded; plaintext traffic is traced"),
    };
    let verdict =
        if traced.is_empty() && tls::unsupported_stack(pid).is_some() { Verdict::Degraded } else { Verdict::Ok };
    finding("TLS", verdict, detail)
}

/// Prints the findings; returns the process exit code (1 when sonde cannot run here).
pub fn report(findings: &[Finding]) -> i32 {
    let mut fatal = false;
    for f in findings {
        let tag = match f.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Degraded => "warn",
            Verdict::Fatal => {
                fatal = true;
                "FAIL"
            }
        };
        println!("[{tag}] {:<20} {}", f.item, f.detail);
    }
    if fatal {
        println!("\nsonde cannot trace on this host: fix the FAIL lines above.");
        1
    } else {
        println!("\nsonde can trace on this host.");
        0
    }
}

#[cfg(test)]
mod tests {
    use super::kernel_version;

    #[test]
    fn kernel_versions_are_read_from_distribution_releases() {
        assert_eq!(kernel_version("6.1.0-50-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("6.12.95+deb12-amd64"), Some((6, 12)));
        assert_eq!(kernel_version("5.10.0-32-amd64"), Some((5, 10)));
        assert_eq!(kernel_version("6.18.0"), Some((6, 18)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version("5.4.0-100-generic").unwrap() < super::MIN_KERNEL);
    }
}
