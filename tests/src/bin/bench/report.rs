//! Medians, targets and BENCHMARKS.md.

use std::{fmt::Write, process::Command};

use crate::{Options, Outcome};

/// Where the hand-written part of BENCHMARKS.md starts (kept when the benchmark rewrites it).
pub const FINDINGS_HEADING: &str = "## Findings, changes and what is left";

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// The numbers one scenario reports.
pub struct Summary {
    pub throughput_off: f64,
    pub throughput_on: f64,
    pub ratio: f64,
    pub p50_off: f64,
    pub p50_on: f64,
    pub p99_off: f64,
    pub p99_on: f64,
    pub cpu_per_10k: f64,
    pub rss_mib: f64,
    pub kernel_ns: f64,
    pub kernel_runs: f64,
    pub lost: u64,
    pub spans: u64,
    /// Spans measured by the metrics (sampled or not).
    pub created: u64,
    pub requests: u64,
    /// Requests the server counted, where every run could read its count.
    pub served: Option<crate::served::Count>,
    pub dropped: u64,
}

impl Summary {
    /// Requests answered: the server's count where known, else the client's.
    fn served_or_requests(&self) -> u64 {
        self.served.map_or(self.requests, |n| n.answered)
    }

    /// Spans to expect, `per_request` for each request answered.
    fn expected_spans(&self, per_request: u64) -> u64 {
        self.served.map_or(self.requests * per_request, |n| n.spans(per_request))
    }

    /// "N requests", with the server's count beside the client's where known.
    fn requests_text(&self) -> String {
        match self.served {
            Some(n) if n.unanswered > 0 => format!(
                "{} requests served and {} not answered completely (the client had gone; no server span) ({} counted by the client)",
                n.answered, n.unanswered, self.requests
            ),
            Some(n) => format!("{} requests served ({} counted by the client)", n.answered, self.requests),
            None => format!("{} requests", self.requests),
        }
    }
}

pub fn summarize(o: &Outcome) -> Summary {
    let off = |f: fn(&crate::load::LoadResult) -> f64| median(o.off.iter().map(f).collect());
    let on = |f: fn(&crate::load::LoadResult) -> f64| median(o.on.iter().map(|r| f(&r.load)).collect());
    Summary {
        throughput_off: off(|r| r.per_second),
        throughput_on: on(|r| r.per_second),
        ratio: median(o.off.iter().zip(&o.on).map(|(a, b)| b.load.per_second / a.per_second).collect()),
        p50_off: off(|r| r.p50_ms),
        p50_on: on(|r| r.p50_ms),
        p99_off: off(|r| r.p99_ms),
        p99_on: on(|r| r.p99_ms),
        cpu_per_10k: median(o.on.iter().map(|r| r.sonde_cpu_seconds / r.load.requests.max(1) as f64 * 1e4).collect()),
        rss_mib: o.on.iter().map(|r| r.peak_rss_mib).fold(0.0, f64::max),
        kernel_ns: median(o.on.iter().map(|r| r.bpf_ns as f64 / r.load.requests.max(1) as f64).collect()),
        kernel_runs: median(o.on.iter().map(|r| r.bpf_runs as f64 / r.load.requests.max(1) as f64).collect()),
        lost: o.on.iter().map(|r| r.events_lost).sum(),
        spans: o.on.iter().map(|r| r.spans_exported).sum(),
        created: o.on.iter().map(|r| r.spans_created).sum(),
        requests: o.on.iter().map(|r| r.load.requests).sum(),
        served: o.on.iter().map(|r| r.served).sum(),
        dropped: o.on.iter().map(|r| r.spans_dropped).sum(),
    }
}

const FLOOR_NOTES: &str = "\n- floor = `sonde run --floor`: programs that only return, attached at exactly the tracepoints sonde uses (the raw\n  `sys_exit` one included) and (HTTPS) as uprobes on the same OpenSSL symbols of the same file; nothing is traced.\n- share of the loss from the hooks = (1 - floor ratio) / (1 - sonde ratio); the rest is sonde's own work (its\n  programs' bodies, the ring buffer, user space). Ratios are medians of per-round ratios.\n- host CPU µs per request: busy time of all CPUs (/proc/stat, everything but idle and iowait) over the run,\n  divided by requests served; added = that arm minus no agent. At saturation every arm keeps both cores busy,\n  so this is the cost per request; the fixed-rate row is the one at equal load.\n- traps: uprobe and uretprobe hits (each enters the kernel through a breakpoint).\n";

/// What the floor arm shows about one scenario.
pub struct FloorSummary {
    /// Throughput with the floor / without an agent (median of rounds).
    pub floor_ratio: f64,
    /// Throughput with sonde / with the floor.
    pub sonde_vs_floor: f64,
    /// Share of sonde's throughput loss that the hooks alone cause.
    pub hooks_share: f64,
    /// Host CPU per request, µs: without an agent, and added by the floor and by sonde.
    pub host_us_off: f64,
    pub host_us_added_floor: f64,
    pub host_us_added_sonde: f64,
    pub runs_floor: f64,
    pub traps_floor: f64,
    pub traps_sonde: f64,
}

pub fn summarize_floor(o: &Outcome) -> FloorSummary {
    let per_req_us = |cpu: f64, r: &crate::load::LoadResult| cpu / r.requests.max(1) as f64 * 1e6;
    let host_off = median(o.off.iter().zip(&o.off_host_cpu).map(|(r, c)| per_req_us(*c, r)).collect());
    let host_floor = median(o.floor.iter().map(|f| per_req_us(f.host_cpu_seconds, &f.load)).collect());
    let host_on = median(o.on.iter().map(|r| per_req_us(r.host_cpu_seconds, &r.load)).collect());
    let floor_ratio = median(o.off.iter().zip(&o.floor).map(|(a, f)| f.load.per_second / a.per_second).collect());
    let on_ratio = median(o.off.iter().zip(&o.on).map(|(a, b)| b.load.per_second / a.per_second).collect());
    let per_req = |n: u64, r: &crate::load::LoadResult| n as f64 / r.requests.max(1) as f64;
    FloorSummary {
        floor_ratio,
        sonde_vs_floor: median(o.floor.iter().zip(&o.on).map(|(f, b)| b.load.per_second / f.load.per_second).collect()),
        hooks_share: if on_ratio < 1.0 { ((1.0 - floor_ratio) / (1.0 - on_ratio)).clamp(0.0, 1.0) } else { f64::NAN },
        host_us_off: host_off,
        host_us_added_floor: host_floor - host_off,
        host_us_added_sonde: host_on - host_off,
        runs_floor: median(o.floor.iter().map(|f| per_req(f.bpf_runs, &f.load)).collect()),
        traps_floor: median(o.floor.iter().map(|f| per_req(f.traps, &f.load)).collect()),
        traps_sonde: median(o.on.iter().map(|r| per_req(r.traps, &r.load)).collect()),
    }
}

/// How far sonde is from the limit of its hooks, and the hooks from no agent.
pub fn floor_table(outcomes: &[Outcome]) -> String {
    let mut t = String::from(
        "| scenario | floor / no agent | sonde / no agent | sonde / floor | share of the loss from the hooks | host CPU µs per req without agent | µs added by the floor | µs added by sonde | program runs per req (floor / sonde) | traps per req (floor / sonde) |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let (s, f) = (summarize(o), summarize_floor(o));
        let _ = writeln!(
            t,
            "| {} | {:.3} | {:.3} | {:.3} | {} | {:.1} | {:+.1} | {:+.1} | {:.1} / {:.1} | {:.1} / {:.1} |",
            o.name,
            f.floor_ratio,
            s.ratio,
            f.sonde_vs_floor,
            if f.hooks_share.is_nan() { "-".to_string() } else { format!("{:.0}%", f.hooks_share * 100.0) },
            f.host_us_off,
            f.host_us_added_floor,
            f.host_us_added_sonde,
            f.runs_floor,
            s.kernel_runs,
            f.traps_floor,
            f.traps_sonde,
        );
    }
    t
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

pub fn summary_table(outcomes: &[Outcome]) -> String {
    let mut t = String::from(
        "| scenario | req/s without | req/s with | ratio (median of pairs) | p50 ms without / with | p99 ms without / with | sonde CPU s per 10k req | sonde peak RSS MiB | in-kernel ns per req | eBPF program runs per req | events lost | spans exported / requests served |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let s = summarize(o);
        let _ = writeln!(
            t,
            "| {} | {:.0} | {:.0} | {:.3} | {:.3} / {:.3} | {:.3} / {:.3} | {:.4} | {:.1} | {:.0} | {:.1} | {} | {} / {}{} |",
            o.name,
            s.throughput_off,
            s.throughput_on,
            s.ratio,
            s.p50_off,
            s.p50_on,
            s.p99_off,
            s.p99_on,
            s.cpu_per_10k,
            s.rss_mib,
            s.kernel_ns,
            s.kernel_runs,
            s.lost,
            s.spans,
            s.served_or_requests(),
            if s.dropped > 0 { format!(" ({} dropped)", s.dropped) } else { String::new() }
        );
    }
    t
}

fn targets(outcomes: &[Outcome]) -> String {
    let mut t = String::from("| target | measured | verdict |\n|---|---|---|\n");
    for o in outcomes {
        let (s, f) = (summarize(o), summarize_floor(o));
        let _ = writeln!(
            t,
            "| {}: sonde within 10% of the floor's throughput | {:.1}% of the floor | {} |",
            o.name,
            f.sonde_vs_floor * 100.0,
            verdict(f.sonde_vs_floor >= 0.90)
        );
        if o.tls {
            let _ = writeln!(
                t,
                "| {}: at most 3 traps per request | {:.1} | {} |",
                o.name,
                f.traps_sonde,
                verdict(f.traps_sonde <= 3.0)
            );
        }
        let fixed_rate = o.name.contains("fixed rate");
        if fixed_rate {
            let _ = writeln!(
                t,
                "| {}: host CPU added <= 3 µs per request | {:.1} µs | {} |",
                o.name,
                f.host_us_added_sonde,
                verdict(f.host_us_added_sonde <= 3.0)
            );
        }
        if fixed_rate {
            let added = (s.p99_on - s.p99_off) / s.p99_off * 100.0;
            let _ = writeln!(t, "| {}: added p99 <= 5% | {added:+.1}% | {} |", o.name, verdict(added <= 5.0));
        } else if let Some(minimum) = ratio_target(o) {
            let _ = writeln!(
                t,
                "| {}: throughput >= {:.0}% of no agent | {:.1}% | {} |",
                o.name,
                minimum * 100.0,
                s.ratio * 100.0,
                verdict(s.ratio >= minimum)
            );
        }
        if !o.tls {
            let _ = writeln!(
                t,
                "| {}: sonde user space <= 1 µs per request | {:.2} µs | {} |",
                o.name,
                s.cpu_per_10k * 100.0,
                verdict(s.cpu_per_10k * 100.0 <= 1.0)
            );
        }
        let limit = if o.tls { 3000.0 } else { 1000.0 };
        let _ = writeln!(
            t,
            "| {}: in-kernel <= {limit:.0} ns per request | {:.0} ns | {} |",
            o.name,
            s.kernel_ns,
            verdict(s.kernel_ns <= limit)
        );
        let _ = writeln!(t, "| {}: RSS <= 40 MB | {:.1} MiB | {} |", o.name, s.rss_mib, verdict(s.rss_mib <= 38.1));
        let expected = s.expected_spans(o.spans_per_request);
        match o.sampled {
            None => {
                let _ = writeln!(
                    t,
                    "| {}: spans exported == {} per request, 0 lost | {} / {}, {} lost | {} |",
                    o.name,
                    o.spans_per_request,
                    s.spans,
                    s.requests_text(),
                    s.lost,
                    verdict(s.spans == expected && s.lost == 0)
                );
            }
            Some(ratio) => {
                // Metrics count every span; the sampler only decides which are exported.
                let _ = writeln!(
                    t,
                    "| {}: every request measured, about {:.0}% exported, 0 lost | {} measured, {} exported ({:.2}%) / {}, {} lost | {} |",
                    o.name,
                    ratio * 100.0,
                    s.created,
                    s.spans,
                    s.spans as f64 / s.served_or_requests().max(1) as f64 * 100.0,
                    s.requests_text(),
                    s.lost,
                    verdict(s.created == expected && s.lost == 0)
                );
            }
        }
    }
    t
}

/// The issue's throughput target for a scenario (vs no agent), where it sets one.
fn ratio_target(o: &Outcome) -> Option<f64> {
    let name = o.name.as_str();
    if o.sampled.is_some() {
        Some(0.80)
    } else if name.starts_with("redis-benchmark -P 1 ") {
        Some(0.90)
    } else if (name.starts_with("nginx, small file, wrk") || name.starts_with("pgbench")) && !o.tls {
        Some(0.85)
    } else {
        None
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = Command::new("uname").arg("-r").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<f64>().unwrap_or(0.0))
        })
        .unwrap_or(0.0);
    format!("{cpu}, {cores} cores, {:.1} GiB RAM, kernel {}", mem / 1048576.0, kernel.unwrap_or_default())
}

pub fn markdown(outcomes: &[Outcome], micro: &[(String, f64)], opts: &Options) -> String {
    let mut md = String::from("# sonde benchmarks\n\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask bench` (tests/src/bin/bench). Re-run it as root on an idle machine; every number\nbelow comes from one run on:\n\n- {}\n- {} rounds per scenario of three arms, {} s per run, interleaved (off, floor, on, off, ...); medians.\n- \"with\" = sonde tracing the server (`--open-ports PORT`), exporting every span over OTLP/HTTP to a local\n  endpoint that accepts and discards (so the cost of encoding and sending is included).\n- Load generator, server and sonde share the same cores: sonde's CPU is taken from the application's.\n",
        machine(),
        opts.pairs,
        opts.seconds
    );
    md.push_str("\n## Results\n\n");
    md.push_str(&summary_table(outcomes));
    md.push_str("\n- sonde CPU s per 10k requests is also cores per 10k requests/s.\n- requests served: the server's own count while sonde ran (nginx `stub_status`, Redis `total_commands_processed`, PostgreSQL `pg_stat_statements`, the Python service's own count of orders answered), read before sonde starts and after it stops. Requests the server began but could not answer completely because the client had gone (nginx: `$request_completion` empty, logged; the Python service counts them) make no server span and are expected without one. The clients count fewer: wrk stops with a request in flight on each connection (served, not counted by wrk), redis-benchmark sends two CONFIG GET and pgbench two setup queries per run.\n- in-kernel ns per request: run_time_ns of all of sonde's eBPF programs (kernel.bpf_stats_enabled) over the run, divided by requests served; runs per request counts every run of those programs, including the\n  ones for the load generator's own syscalls that the PID filter rejects.\n");
    md.push_str("\n## The floor: what the hooks cost before sonde does anything\n\n");
    md.push_str(&floor_table(outcomes));
    md.push_str(FLOOR_NOTES);
    md.push_str(
        "\n## User-space pipeline (criterion, one core)\n\n| benchmark | per second | target |\n|---|---|---|\n",
    );
    for (name, per_second) in micro {
        let (target, ok) = if name.starts_with("otlp") {
            ("100k spans/s", *per_second >= 100_000.0)
        } else {
            ("250k events/s", *per_second >= 250_000.0)
        };
        let _ = writeln!(md, "| {name} | {per_second:.0} | {target}: {} |", verdict(ok));
    }
    let _ = writeln!(
        md,
        "\nEvents are syscall-sized (one request or one response each) replayed through `Pipeline::on_data`: reassembly, detection, parsing, pairing, span assembly, sampling and the RED metrics. Command: `{}`.",
        crate::micro::COMMAND
    );
    md.push_str("\n## Targets\n\n");
    md.push_str(&targets(outcomes));
    md.push_str("\n## Commands\n\n");
    for o in outcomes {
        let _ = writeln!(md, "- {}: `{}`", o.name, o.command);
    }
    md.push_str("\n## Every run\n\n| scenario | round | req/s without | req/s floor | req/s with | p99 ms without / with | sonde CPU s | in-kernel ns/req | spans / requests (served) |\n|---|---|---|---|---|---|---|---|---|\n");
    for o in outcomes {
        for (i, ((off, on), floor)) in o.off.iter().zip(&o.on).zip(&o.floor).enumerate() {
            let _ = writeln!(
                md,
                "| {} | {i} | {:.0} | {:.0} | {:.0} | {:.3} / {:.3} | {:.2} | {} | {} / {}{} |",
                o.name,
                off.per_second,
                floor.load.per_second,
                on.load.per_second,
                off.p99_ms,
                on.load.p99_ms,
                on.sonde_cpu_seconds,
                on.bpf_ns / on.load.requests.max(1),
                on.spans_exported,
                on.load.requests,
                on.served.map_or(String::new(), |n| format!(" ({})", crate::served_text(n)))
            );
        }
    }
    md
}
