//! `cargo xtask bench`: sonde's overhead against no agent, measured in the same run.
//!
//! Every scenario runs its load in three interleaved arms: without sonde, with the floor (sonde
//! `--floor`: programs that only return, at exactly sonde's hook points) and with sonde tracing
//! the server (off, floor, on, off, ...), same binaries, same machine, and reports medians. The
//! floor separates what the hook mechanism costs from what sonde's own work costs. Results go to
//! BENCHMARKS.md. Needs root (eBPF, kernel.bpf_stats_enabled).

mod load;
mod micro;
mod probe;
mod report;
mod served;
mod sink;

use std::time::Duration;

use load::LoadResult;
use sonde_e2e::{TempDir, bpf_stats, free_port, servers, sonde::Sonde};

/// Connections of the open-loop client (one request in flight on each). With 16, each had about
/// 0.5 ms per request at 30k/s: a round trip slowed by sharing two cores made the client itself
/// fall behind its schedule, and the queue it built dominated p50 and p99.
const FIXED_RATE_CONNECTIONS: u32 = 64;

/// One measured run of a scenario with the floor attached.
#[derive(Clone, Debug, Default)]
pub struct FloorRun {
    pub load: LoadResult,
    pub host_cpu_seconds: f64,
    pub bpf_runs: u64,
    /// Uprobe and uretprobe hits (each one a trap).
    pub traps: u64,
}

/// One measured run of a scenario with sonde attached.
#[derive(Clone, Debug, Default)]
pub struct OnRun {
    pub load: LoadResult,
    pub host_cpu_seconds: f64,
    pub traps: u64,
    pub sonde_cpu_seconds: f64,
    pub peak_rss_mib: f64,
    pub bpf_ns: u64,
    pub bpf_runs: u64,
    pub events_lost: u64,
    pub spans_exported: u64,
    /// Spans measured (metrics count every one, sampled or not).
    pub spans_created: u64,
    pub spans_dropped: u64,
    /// Requests the server counted while sonde ran, where it can tell (see `served`).
    pub served: Option<served::Count>,
}

pub struct Outcome {
    pub name: String,
    pub command: String,
    pub off: Vec<LoadResult>,
    /// Host CPU seconds of each run without an agent.
    pub off_host_cpu: Vec<f64>,
    pub floor: Vec<FloorRun>,
    pub on: Vec<OnRun>,
    pub tls: bool,
    pub spans_per_request: u64,
    /// The trace sampler's ratio, when not every span is exported.
    pub sampled: Option<f64>,
}

/// What one scenario runs and expects.
pub struct Scenario<'a> {
    pub name: String,
    pub command: String,
    pub tls: bool,
    /// Spans each request makes (a server span, plus the client spans of an application).
    pub spans_per_request: u64,
    /// `OTEL_TRACES_SAMPLER=traceidratio` with this ratio.
    pub sampled: Option<f64>,
    /// sonde's arguments that select the server.
    pub select: &'a [String],
    /// The server's own count of requests served, where it keeps one.
    pub served: Option<served::Counter>,
}

impl<'a> Scenario<'a> {
    fn new(name: impl Into<String>, command: String, select: &'a [String]) -> Self {
        Self { name: name.into(), command, tls: false, spans_per_request: 1, sampled: None, select, served: None }
    }
}

pub struct Options {
    pub pairs: usize,
    pub seconds: u32,
    /// `--only a,b`: run only these scenarios (micro, nginx, fixed-rate, redis, pgbench, python, https).
    pub only: Option<Vec<String>>,
    /// `--rate N`: the fixed-rate scenario's requests per second, instead of half the measured
    /// baseline (to compare builds at the same load).
    pub rate: Option<u32>,
    /// `--syscalls paired`: hook the data syscalls at enter and exit, the design before the exit
    /// hook (sonde's hidden `--paired-syscalls`), to compare the two. Such runs never rewrite
    /// BENCHMARKS.md.
    pub paired_syscalls: bool,
}

impl Options {
    fn runs(&self, scenario: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.iter().any(|s| s == scenario))
    }
}

const USAGE: &str =
    "usage: bench [--only micro,nginx,fixed-rate,redis,pgbench,python,https] [--pairs N] [--seconds S] [--rate R] [--syscalls exit|paired]
  run as root; without --only (and with the default --syscalls exit) it rewrites BENCHMARKS.md";

fn options() -> Options {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Every flag takes a value: anything else (--help, a typo) prints the usage instead of
    // starting a full run that rewrites BENCHMARKS.md.
    for pair in args.chunks(2) {
        let known = ["--only", "--pairs", "--seconds", "--rate", "--syscalls"].contains(&pair[0].as_str());
        if !known || pair.len() < 2 {
            eprintln!("{USAGE}");
            std::process::exit(if pair[0] == "--help" || pair[0] == "-h" { 0 } else { 2 });
        }
    }
    let value = |flag: &str, default: u32| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_owned).collect());
    let rate = Some(value("--rate", 0)).filter(|r| *r > 0);
    let paired_syscalls = match args.iter().position(|a| a == "--syscalls").map(|i| args[i + 1].as_str()) {
        None | Some("exit") => false,
        Some("paired") => true,
        Some(other) => {
            eprintln!("--syscalls {other}: expected exit or paired\n{USAGE}");
            std::process::exit(2);
        }
    };
    Options { pairs: value("--pairs", 5) as usize, seconds: value("--seconds", 5), only, rate, paired_syscalls }
}

/// Runs `load` in `pairs` rounds of no agent, floor and sonde.
fn measure(scenario: Scenario, opts: &Options, sink: &sink::Sink, mut load: impl FnMut() -> LoadResult) -> Outcome {
    println!("==> {}: {} rounds of {}s runs (off, floor, on)", scenario.name, opts.pairs, opts.seconds);
    let mut out = Outcome {
        name: scenario.name,
        command: scenario.command,
        off: Vec::new(),
        off_host_cpu: Vec::new(),
        floor: Vec::new(),
        on: Vec::new(),
        tls: scenario.tls,
        spans_per_request: scenario.spans_per_request,
        sampled: scenario.sampled,
    };
    let mut args: Vec<&str> = scenario.select.iter().map(String::as_str).collect();
    if opts.paired_syscalls {
        args.push("--paired-syscalls");
    }
    let floor_args: Vec<&str> = args.iter().copied().chain(["--floor"]).collect();
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", sink.endpoint()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
        ("OTEL_METRICS_EXPORTER", "none".to_owned()),
    ];
    if let Some(ratio) = scenario.sampled {
        env.push(("OTEL_TRACES_SAMPLER", "traceidratio".to_owned()));
        env.push(("OTEL_TRACES_SAMPLER_ARG", ratio.to_string()));
    }
    let traps = |pid: u32, floor: bool| {
        if floor { bpf_stats::runs_of(pid, "floor_u") } else { bpf_stats::runs_of(pid, "ssl_") }
    };
    for pair in 0..opts.pairs {
        let host0 = probe::host_busy_seconds();
        let off = load();
        let host_off = probe::host_busy_seconds() - host0;
        println!(
            "    pair {pair}: off   {:>9.0}/s p50 {:.3} ms p99 {:.3} ms; host {:.1} us/req",
            off.per_second,
            off.p50_ms,
            off.p99_ms,
            host_off / off.requests.max(1) as f64 * 1e6
        );
        out.off.push(off);
        out.off_host_cpu.push(host_off);

        let floor = Sonde::start(&floor_args, "", &env);
        let pid = floor.pid();
        let (runs0, traps0, host0) = (bpf_stats::run_time(pid).1, traps(pid, true), probe::host_busy_seconds());
        let load_floor = load();
        let host_floor = probe::host_busy_seconds() - host0;
        let run = FloorRun {
            host_cpu_seconds: host_floor,
            bpf_runs: bpf_stats::run_time(pid).1 - runs0,
            traps: traps(pid, true) - traps0,
            load: load_floor,
        };
        let finished = floor.stop();
        assert!(finished.status.success(), "sonde --floor failed:\n{}", finished.stderr);
        println!(
            "    pair {pair}: floor {:>9.0}/s p50 {:.3} ms p99 {:.3} ms; host {:.1} us/req, {:.1} runs and {:.1} traps per req",
            run.load.per_second,
            run.load.p50_ms,
            run.load.p99_ms,
            host_floor / run.load.requests.max(1) as f64 * 1e6,
            run.bpf_runs as f64 / run.load.requests.max(1) as f64,
            run.traps as f64 / run.load.requests.max(1) as f64,
        );
        out.floor.push(run);

        let served_before = scenario.served.as_ref().map(served::Counter::read);
        let sonde = Sonde::start(&args, "", &env);
        let pid = sonde.pid();
        let (cpu0, (ns0, runs0)) = (probe::cpu_seconds(pid), bpf_stats::run_time(pid));
        let (traps0, host0) = (traps(pid, false), probe::host_busy_seconds());
        let on = load();
        let host_on = probe::host_busy_seconds() - host0;
        // Let sonde finish what the kernel queued before reading its costs.
        std::thread::sleep(Duration::from_millis(500));
        let (cpu1, (ns1, runs1)) = (probe::cpu_seconds(pid), bpf_stats::run_time(pid));
        let traps_on = traps(pid, false) - traps0;
        let rss = probe::peak_rss_mib(pid);
        let finished = sonde.stop();
        assert!(finished.status.success(), "sonde failed:\n{}", finished.stderr);
        let served = scenario.served.as_ref().zip(served_before).map(|(c, before)| c.between(before, c.read()));
        let c = |k: &str| finished.counter(k).unwrap_or(0);
        let run = OnRun {
            load: on,
            host_cpu_seconds: host_on,
            traps: traps_on,
            sonde_cpu_seconds: cpu1 - cpu0,
            peak_rss_mib: rss,
            bpf_ns: ns1 - ns0,
            bpf_runs: runs1 - runs0,
            events_lost: c("events_lost"),
            spans_exported: c("spans_exported"),
            spans_created: c("spans_created"),
            spans_dropped: c("spans_dropped_queue_full") + c("spans_dropped_export_failed"),
            served,
        };
        println!(
            "    pair {pair}: on    {:>9.0}/s p50 {:.3} ms p99 {:.3} ms; sonde {:.2} CPU s, {:.1} MiB, {} ns/req in kernel, {} spans / {} requests (server: {}), {} lost",
            run.load.per_second,
            run.load.p50_ms,
            run.load.p99_ms,
            run.sonde_cpu_seconds,
            run.peak_rss_mib,
            run.bpf_ns / run.load.requests.max(1),
            run.spans_exported,
            run.load.requests,
            run.served.map_or("?".to_owned(), served_text),
            run.events_lost
        );
        out.on.push(run);
    }
    out
}

/// A server's count as the progress lines show it.
fn served_text(n: served::Count) -> String {
    match n.unanswered {
        0 => n.answered.to_string(),
        gone => format!("{} answered + {gone} unanswered", n.answered),
    }
}

fn main() {
    let opts = options();
    // SAFETY: geteuid has no preconditions.
    assert!(unsafe { geteuid() } == 0, "the benchmark loads eBPF programs: run it as root (cargo xtask bench)");
    let micro = if opts.runs("micro") {
        println!("==> user-space micro-benchmarks: {}", micro::COMMAND);
        micro::run()
    } else {
        Vec::new()
    };
    for (name, per_second) in &micro {
        println!("    {name}: {per_second:.0}/s");
    }
    let _stats = bpf_stats::BpfStats::enable();
    let sink = sink::Sink::start();
    let secs = opts.seconds;
    let mut outcomes = Vec::new();

    // 1. nginx, small static file, wrk at saturation.
    let nginx = servers::nginx(free_port());
    let url = format!("http://127.0.0.1:{}/index.html", nginx.port);
    let nginx_status = served::Counter::NginxStatus(
        format!("http://127.0.0.1:{}/stub_status", nginx.port),
        nginx.file(servers::NGINX_INCOMPLETE_LOG).expect("nginx has its directory"),
    );
    let select = vec!["--open-ports".to_owned(), nginx.port.to_string()];
    let mut baseline = None;
    if opts.runs("nginx") {
        let o = measure(
            Scenario {
                served: Some(nginx_status.clone()),
                ..Scenario::new(
                    "nginx, small file, wrk saturation (keep-alive, 32 connections)",
                    format!("wrk -t 1 -c 32 -d {secs}s --latency {url}"),
                    &select,
                )
            },
            &opts,
            &sink,
            || load::wrk(&url, 32, secs),
        );
        baseline = Some(report::median(o.off.iter().map(|r| r.per_second).collect()));
        outcomes.push(o);
    }

    // 2. The same server at half the baseline's maximum, open loop.
    if opts.runs("fixed-rate") {
        let rate = match opts.rate {
            Some(rate) => f64::from(rate),
            None => (baseline.unwrap_or_else(|| load::wrk(&url, 32, secs).per_second) / 2.0).round(),
        };
        let port = nginx.port;
        outcomes.push(measure(
            Scenario {
                served: Some(nginx_status.clone()),
                ..Scenario::new(
                    "nginx, small file, fixed rate at half the baseline maximum",
                    format!("open-loop client (bench/load.rs): {rate} req/s over {FIXED_RATE_CONNECTIONS} keep-alive connections for {secs}s"),
                    &select,
                )
            },
            &opts,
            &sink,
            || load::fixed_rate(port, "/index.html", rate, FIXED_RATE_CONNECTIONS, secs),
        ));
    }
    drop(nginx);

    // 3. Redis, without and with pipelining, and pipelined at the sampling production uses.
    let redis = servers::redis(free_port());
    let select = vec!["--open-ports".to_owned(), redis.port.to_string()];
    let redis_runs = [(1, 100_000, None), (16, 400_000, None), (16, 400_000, Some(0.01))];
    for (pipeline, n, sampled) in redis_runs.into_iter().filter(|_| opts.runs("redis")) {
        let port = redis.port;
        let mut scenario = Scenario::new(
            match sampled {
                None => format!("redis-benchmark -P {pipeline} (GET + SET)"),
                Some(r) => format!("redis-benchmark -P {pipeline} (GET + SET), {}% of traces sampled", r * 100.0),
            },
            format!("redis-benchmark -p {port} -t set,get -n {n} -c 16 -P {pipeline} --csv"),
            &select,
        );
        scenario.sampled = sampled;
        scenario.served = Some(served::Counter::Redis(port));
        outcomes.push(measure(scenario, &opts, &sink, || load::redis_benchmark(port, pipeline, n)));
    }

    // 4. PostgreSQL, read-only pgbench over the extended protocol.
    let pg = servers::postgres_counting_statements(free_port());
    let logs = TempDir::new("pgbench");
    let _ = std::process::Command::new("chmod").arg("777").arg(logs.path()).status();
    let port = pg.port;
    if opts.runs("pgbench") {
        let select = vec!["--open-ports".to_owned(), pg.port.to_string()];
        outcomes.push(measure(
            Scenario {
                served: Some(served::Counter::Postgres(port, servers::PG_PASSWORD)),
                ..Scenario::new(
                    "pgbench -S -M extended",
                    format!(
                        "pgbench -S -M extended -c 4 -j 2 -T {secs} -n -l -h 127.0.0.1 -p {port} -U postgres postgres"
                    ),
                    &select,
                )
            },
            &opts,
            &sink,
            || load::pgbench(port, secs, servers::PG_PASSWORD, logs.path()),
        ));
    }

    // 5. A Python application: every request queries PostgreSQL and Redis (a typical per-request
    // cost, beside the worst cases above).
    if opts.runs("python") {
        let app_port = free_port();
        let app = servers::python_app(app_port, pg.port, redis.port);
        let url = format!("http://127.0.0.1:{app_port}/order/7");
        let select = vec!["--open-ports".to_owned(), app_port.to_string()];
        let mut scenario = Scenario::new(
            "Python HTTP service (http.server, one PostgreSQL query and two Redis commands per request)",
            format!("wrk -t 1 -c 8 -d {secs}s --latency {url} (tests/fixtures/app.py)"),
            &select,
        );
        scenario.spans_per_request = 4;
        scenario.served = Some(served::Counter::App(format!("http://127.0.0.1:{app_port}")));
        outcomes.push(measure(scenario, &opts, &sink, || load::wrk(&url, 8, secs)));
        drop(app);
    }
    drop((pg, redis));

    // 6. nginx over HTTPS, plaintext captured by the OpenSSL uprobes.
    let nginx = servers::nginx_with(free_port(), Some(()));
    let url = format!("https://127.0.0.1:{}/index.html", nginx.port);
    let select = vec!["--open-ports".to_owned(), nginx.port.to_string()];
    if opts.runs("https") {
        let mut scenario = Scenario::new(
            "nginx HTTPS, small file, wrk saturation (TLS uprobes)",
            format!("wrk -t 1 -c 32 -d {secs}s --latency {url}"),
            &select,
        );
        scenario.tls = true;
        scenario.served = Some(served::Counter::NginxStatus(
            format!("https://127.0.0.1:{}/stub_status", nginx.port),
            nginx.file(servers::NGINX_INCOMPLETE_LOG).expect("nginx has its directory"),
        ));
        outcomes.push(measure(scenario, &opts, &sink, || load::wrk(&url, 32, secs)));
    }
    drop(nginx);

    println!("\n{}\n{}", report::summary_table(&outcomes), report::floor_table(&outcomes));
    // A partial run (--only) does not replace the full record.
    if opts.only.is_none() && !opts.paired_syscalls {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
        // The hand-written findings after the generated part survive a re-run.
        let previous = std::fs::read_to_string(&path).unwrap_or_default();
        let findings = previous.find(report::FINDINGS_HEADING).map(|i| &previous[i..]).unwrap_or("");
        let text = format!("{}\n{findings}", report::markdown(&outcomes, &micro, &opts));
        std::fs::write(&path, text.trim_end().to_owned() + "\n").expect("write BENCHMARKS.md");
        println!("==> wrote {}", path.display());
    }
}

unsafe extern "C" {
    fn geteuid() -> u32;
}
