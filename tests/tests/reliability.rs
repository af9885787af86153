//! Reliability end to end, privileged: a collector outage, process and connection churn, and
//! sonde killed with SIGKILL. Each test measures what the issue promises: memory under its
//! bound, drops counted exactly, kernel and user-space state back to baseline, no probe left.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use sonde_e2e::{
    clients::{Launcher, curl, sample, scrape, wrk},
    free_port,
    otlp::HttpReceiver,
    privileged_test, servers,
    sonde::{Sonde, test_config},
};

/// URLs `/{prefix}/{first}..` for one curl run (one keep-alive connection).
fn urls(port: u16, prefix: &str, first: usize, n: usize) -> Vec<String> {
    (first..first + n).map(|i| format!("http://127.0.0.1:{port}/{prefix}/{i}")).collect()
}

#[test]
fn privileged_collector_outage_bounded_memory_export_resumes_drops_counted_exactly() {
    let Some(_guard) = privileged_test("OTLP collector outage") else {
        return;
    };
    const OUTAGE: Duration = Duration::from_secs(120);
    const QUEUE: usize = 2000;
    let server = servers::nginx(free_port());
    let collector_port = free_port();
    let metrics_port = free_port();
    let cfg = test_config(&format!("    queue_spans: {QUEUE}\n    batch_spans: 500\n"));
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{collector_port}")),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
        ("OTEL_METRICS_EXPORTER", "none".into()),
    ];
    let sonde = Sonde::start(
        &["--open-ports", &server.port.to_string(), "--prometheus-port", &metrics_port.to_string()],
        &cfg,
        &env,
    );

    // The collector is down: keep traffic flowing for the whole outage, watching sonde's memory.
    let started = Instant::now();
    let (mut requests, mut rss_after_warmup, mut rss_max) = (0, 0, 0);
    while started.elapsed() < OUTAGE {
        curl(&["-o", "/dev/null"], &urls(server.port, "outage", requests, 1000));
        requests += 1000;
        let rss = sonde.rss_kib();
        rss_max = rss_max.max(rss);
        if rss_after_warmup == 0 && started.elapsed() > Duration::from_secs(20) {
            rss_after_warmup = rss;
        }
    }
    assert!(requests > 20 * QUEUE, "the outage saw too little traffic to fill the queue: {requests}");

    // The collector comes back: what the queue held is delivered, then new spans flow again.
    let receiver = HttpReceiver::start_on(collector_port);
    let resumed = sonde_e2e::wait_for(Duration::from_secs(30), || (receiver.collected.len() >= QUEUE).then_some(()));
    assert!(resumed.is_some(), "export did not resume: {} spans\n{}", receiver.collected.len(), sonde.stderr());
    curl(&["-o", "/dev/null"], &urls(server.port, "after", 0, 500));
    let after = sonde_e2e::wait_for(Duration::from_secs(20), || {
        let n = receiver.collected.count_path_prefix("/after/");
        (n >= 500).then_some(n)
    });
    std::thread::sleep(Duration::from_secs(2));
    let exposition = scrape(metrics_port);
    let finished = sonde.stop();
    assert!(finished.status.success(), "{}", finished.stderr);
    assert_eq!(after, Some(500), "every request after the outage is exported");

    let c = |name: &str| finished.counter(name).unwrap_or_else(|| panic!("{name} missing: {}", finished.stderr));
    let (created, exported, failed, queue_full) =
        (c("spans_created"), c("spans_exported"), c("spans_dropped_export_failed"), c("spans_dropped_queue_full"));
    assert_eq!(created, requests as u64 + 500, "one span per request: {}", finished.stderr);
    assert_eq!(c("events_lost"), 0);
    assert_eq!(exported, receiver.collected.len() as u64, "exported means the collector got it");
    assert_eq!(exported + failed + queue_full, created, "every span exported or counted as dropped");
    assert!(queue_full > 0, "the bounded queue overflowed during the outage and said so");
    assert!(failed >= 500, "a batch retried past the retry limit is dropped and counted: {failed}");
    assert!(exported >= QUEUE as u64 + 500, "what the queue held was delivered after the outage: {exported}");
    // The same numbers on the self-metrics endpoint.
    assert_eq!(sample(&exposition, "sonde_spans_dropped_total{reason=\"queue_full\"}"), Some(queue_full as f64));
    assert_eq!(sample(&exposition, "sonde_spans_dropped_total{reason=\"export_failed\"}"), Some(failed as f64));
    // One warning when the outage starts, one line when it ends: no log flood.
    assert_eq!(finished.stderr.matches("failing:").count(), 1, "{}", finished.stderr);
    assert_eq!(finished.stderr.matches("OTLP export recovered after").count(), 1, "{}", finished.stderr);
    // Memory: bounded by the queue, flat while the outage goes on.
    assert!(rss_max < 80 * 1024, "sonde's RSS reached {rss_max} KiB during the outage");
    assert!(
        rss_max <= rss_after_warmup + 8 * 1024,
        "sonde's RSS grew from {rss_after_warmup} to {rss_max} KiB while the collector was down"
    );
    eprintln!(
        "outage: {requests} requests, exported {exported}, dropped queue_full={queue_full} export_failed={failed}, RSS {rss_after_warmup}..{rss_max} KiB"
    );
    drop(server);
}

/// sonde's view of its own state: kernel map entries by map, connections, traced processes.
fn state(metrics_port: u16) -> BTreeMap<String, u64> {
    let text = scrape(metrics_port);
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let interesting = ["sonde_kernel_map_entries{", "sonde_connections_tracked ", "sonde_traced_processes "];
        if interesting.iter().any(|p| line.starts_with(p))
            && let Some((series, value)) = line.rsplit_once(' ')
        {
            out.insert(series.to_owned(), value.parse().unwrap_or(u64::MAX));
        }
    }
    out
}

#[test]
fn privileged_process_and_connection_churn_leaves_no_state_behind() {
    let Some(_guard) = privileged_test("process and connection churn") else {
        return;
    };
    const PROCESSES: usize = 2000;
    const CONNECTIONS: usize = 100_000;
    let server = servers::nginx(free_port());
    let port = server.port;
    let mut launcher = Launcher::start();
    let metrics_port = free_port();
    let sonde = Sonde::start(
        &[
            "--open-ports",
            &port.to_string(),
            "--pid",
            &launcher.pid().to_string(),
            "--prometheus-port",
            &metrics_port.to_string(),
            "--print",
            "none",
        ],
        &test_config(""),
        &[],
    );
    // Warm up (the launcher has forked once), then take the baseline.
    assert_eq!(launcher.run(&format!("curl -sf -o /dev/null http://127.0.0.1:{port}/")), 0);
    let settled = |what: &str| {
        // Map fill is refreshed every 5 s; exits are noticed at once, rescans within 5 s.
        std::thread::sleep(Duration::from_secs(12));
        let s = state(metrics_port);
        assert!(s.keys().any(|k| k.contains("map=\"sockets\"")), "no kernel map metrics {what}: {s:?}");
        s
    };
    let baseline = settled("at baseline");

    // 2,000 short-lived traced processes, one request each.
    let code = launcher.run(&format!(
        "for i in $(seq 1 {PROCESSES}); do curl -sf -o /dev/null http://127.0.0.1:{port}/index.html?p=$i || exit 1; done"
    ));
    assert_eq!(code, 0, "curl loop failed");
    let lost_after_processes = sample(&scrape(metrics_port), "sonde_events_lost_total");
    // 100,000 short connections from one traced process: connect, one request, close.
    let script = format!(
        "import socket\nreq=b'GET /conn HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n'\nfor i in range({CONNECTIONS}):\n    s=socket.create_connection(('127.0.0.1',{port}))\n    s.sendall(req)\n    while s.recv(65536): pass\n    s.close()\n"
    );
    let dir = sonde_e2e::TempDir::new("churn");
    let script_path = dir.path().join("churn.py");
    std::fs::write(&script_path, script).expect("write churn client");
    assert_eq!(launcher.run(&format!("python3 {}", script_path.display())), 0, "churn client failed");

    let churn_cpu = sonde.cpu_seconds();
    let lost_after_connections = sample(&scrape(metrics_port), "sonde_events_lost_total");
    eprintln!(
        "churn: events lost after the processes {lost_after_processes:?}, after the connections {lost_after_connections:?}"
    );
    let mut after = settled("after churn");
    let threads = threads_in_groups(&[server.pid(), launcher.pid()]);
    let finished = sonde.stop();
    assert!(finished.status.success(), "{}", finished.stderr);
    // Per-thread maps hold at most one entry per live traced thread (which threads have one
    // depends on which nginx worker served what); everything else returns to exactly baseline.
    let mut baseline = baseline;
    for map in ["inflight", "last_read_fd", "tls_calls", "tls_handshakes"] {
        let key = format!("sonde_kernel_map_entries{{map=\"{map}\"}}");
        let n = after.remove(&key).unwrap_or(u64::MAX);
        assert!(n <= threads as u64, "{map}: {n} entries for {threads} live traced threads");
        baseline.remove(&key);
    }
    assert_eq!(after, baseline, "kernel maps, connections and traced processes back to baseline");
    // Every request was seen from both ends.
    let requests = (1 + PROCESSES + CONNECTIONS) as u64;
    assert_eq!(finished.counter("events_lost"), Some(0), "{}", finished.stderr);
    // On a mismatch, the counters say where the request went (unmatched, parse errors, a
    // connection or process sonde did not see open...).
    let counters = finished.stderr.lines().rev().find(|l| l.contains("final counters:")).unwrap_or_default();
    assert_eq!(finished.counter("spans_created"), Some(2 * requests), "client and server span per request; {counters}");
    eprintln!("churn: sonde used {churn_cpu:.1} s CPU; baseline {baseline:?}");
    drop(server);
}

/// Threads of every process in these process groups.
fn threads_in_groups(groups: &[u32]) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised command: state, ppid, pgrp, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let pgrp: u32 = rest.split_whitespace().nth(2).and_then(|p| p.parse().ok()).unwrap_or(0);
        if groups.contains(&pgrp) {
            n += std::fs::read_dir(entry.path().join("task")).map(|d| d.count()).unwrap_or(0);
        }
    }
    n
}

/// Loaded BPF programs and links on the whole machine, and the kernel's text-defined probes.
fn kernel_bpf_state() -> (usize, usize, String) {
    let programs = aya::programs::loaded_programs().filter(Result::is_ok).count();
    let links = aya::programs::loaded_links().filter(Result::is_ok).count();
    let probes = ["uprobe_events", "kprobe_events"]
        .iter()
        .map(|f| std::fs::read_to_string(format!("/sys/kernel/tracing/{f}")).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("");
    (programs, links, probes)
}

#[test]
fn privileged_sigkill_leaves_no_probes_and_the_application_never_notices() {
    let Some(_guard) = privileged_test("sonde killed with SIGKILL") else {
        return;
    };
    let server = servers::nginx_with(free_port(), Some(()));
    let port = server.port;
    let before = kernel_bpf_state();
    let sonde = Sonde::start(&["--open-ports", &port.to_string(), "--print", "none"], &test_config(""), &[]);
    let traced = sonde_e2e::wait_for(Duration::from_secs(15), || sonde.stderr().contains("TLS traced").then_some(()));
    assert!(traced.is_some(), "TLS uprobes never attached:\n{}", sonde.stderr());
    let loaded = kernel_bpf_state();
    assert!(loaded.0 > before.0, "sonde's programs are loaded: {} -> {}", before.0, loaded.0);

    // HTTPS traffic keeps going while sonde dies mid-stream.
    let client = std::thread::spawn(move || {
        curl(
            &["-k", "-o", "/dev/null", "-w", "%{http_code}\\n"],
            &urls(port, "during", 0, 3000).iter().map(|u| u.replace("http:", "https:")).collect::<Vec<_>>(),
        )
    });
    std::thread::sleep(Duration::from_millis(700));
    let status = sonde.kill();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
    let codes = client.join().expect("client thread");
    assert_eq!(codes.lines().filter(|c| *c == "404").count(), 3000, "every request answered while sonde died");

    // The kernel detached everything when sonde's file descriptors closed.
    let cleaned = sonde_e2e::wait_for(Duration::from_secs(10), || (kernel_bpf_state() == before).then_some(()));
    assert!(cleaned.is_some(), "left behind after SIGKILL: before {before:?}, now {:?}", kernel_bpf_state());

    // A restarted sonde traces again, exactly.
    let receiver = HttpReceiver::start();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
    ];
    let sonde = Sonde::start(&["--open-ports", &port.to_string()], &test_config(""), &env);
    let again: Vec<String> = urls(port, "again", 0, 50).iter().map(|u| u.replace("http:", "https:")).collect();
    curl(&["-k", "-o", "/dev/null"], &again);
    let spans = receiver.collected.wait_for(50, Duration::from_secs(20));
    let finished = sonde.stop();
    assert_eq!(spans.len(), 50, "{}", finished.stderr);
    assert!(spans.iter().all(|s| s.s("url.scheme") == Some("https") && s.kind == "SERVER"));
    drop(server);
}

/// Overload taken to the extreme: sonde's user space frozen (SIGSTOP) while the application
/// runs flat out. The kernel side sheds (ring buffer full: events dropped and counted), the
/// application never waits: its throughput is at least what it is while sonde keeps up, every
/// request is answered, and after SIGCONT sonde reports the loss and traces new traffic exactly.
#[test]
fn privileged_frozen_sonde_never_slows_the_application_and_counts_what_it_shed() {
    let Some(_guard) = privileged_test("overload: sonde frozen") else {
        return;
    };
    let server = servers::nginx(free_port());
    let url = format!("http://127.0.0.1:{}/", server.port);
    let receiver = HttpReceiver::start();
    let metrics_port = free_port();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
    ];
    let cfg = test_config("capture:\n  ring_buffer_bytes: 262144\n  wakeup_bytes: 65536\n");
    let sonde = Sonde::start(
        &["--open-ports", &server.port.to_string(), "--prometheus-port", &metrics_port.to_string()],
        &cfg,
        &env,
    );
    let keeping_up = wrk(&url, 8, 3);
    assert_eq!(keeping_up.non_2xx, 0);
    sonde_e2e::sonde::signal(sonde.pid(), 19); // SIGSTOP
    let frozen = wrk(&url, 8, 3);
    sonde_e2e::sonde::signal(sonde.pid(), 18); // SIGCONT
    assert_eq!(frozen.non_2xx, 0, "every request answered while sonde was frozen");
    let (keeping_up, frozen) = (keeping_up.per_second, frozen.per_second);
    assert!(
        frozen >= 0.8 * keeping_up,
        "the application waited for sonde: {frozen:.0} req/s frozen vs {keeping_up:.0} req/s keeping up"
    );

    // The loss is counted where it happened, and sonde goes on tracing.
    let lost = sonde_e2e::wait_for(Duration::from_secs(10), || {
        sample(&scrape(metrics_port), "sonde_events_lost_total").filter(|n| *n > 0.0)
    });
    assert!(lost.is_some(), "ring buffer drops were not reported:\n{}", scrape(metrics_port));
    std::thread::sleep(Duration::from_secs(2));
    let before = receiver.collected.len();
    curl(&["-o", "/dev/null"], &urls(server.port, "after", 0, 100));
    let after = sonde_e2e::wait_for(Duration::from_secs(20), || {
        let n = receiver.collected.count_path_prefix("/after/");
        (n >= 100).then_some(n)
    });
    std::thread::sleep(Duration::from_secs(1));
    let finished = sonde.stop();
    assert!(finished.status.success(), "{}", finished.stderr);
    assert_eq!(after, Some(100), "traced exactly again after the overload");
    eprintln!(
        "overload: {keeping_up:.0} req/s with sonde keeping up, {frozen:.0} req/s with sonde frozen; events lost {lost:?}; spans before {before}"
    );
}
