//! Load generators and what they report: wrk (saturation), an open-loop fixed-rate HTTP client,
//! redis-benchmark and pgbench. Each returns requests served, throughput and p50/p99 latency.

use std::{process::Command, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    pub requests: u64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// wrk at saturation: `connections` keep-alive connections for `seconds`.
pub fn wrk(url: &str, connections: u32, seconds: u32) -> LoadResult {
    let r = sonde_e2e::clients::wrk(url, connections, seconds);
    LoadResult { requests: r.requests, per_second: r.per_second, p50_ms: r.p50_ms, p99_ms: r.p99_ms }
}

/// Open-loop HTTP load at `rate` requests/s over `connections` keep-alive connections: each
/// request has a scheduled send time and its latency counts from then, so a stall shows up as
/// latency instead of silently lowering the rate (what wrk2 does).
pub fn fixed_rate(port: u16, path: &str, rate: f64, connections: u32, seconds: u32) -> LoadResult {
    // One thread and an event loop (like wrk2), not a thread per connection: the client's own
    // scheduling cost stays small, so what the latencies show is the server's.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let request: std::sync::Arc<[u8]> = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").into_bytes().into();
    let mut all: Vec<f64> = runtime.block_on(async move {
        let per_conn_interval = Duration::from_secs_f64(connections as f64 / rate);
        let start = tokio::time::Instant::now() + Duration::from_millis(100);
        let end = start + Duration::from_secs(seconds as u64);
        let workers: Vec<_> = (0..connections)
            .map(|c| {
                let request = request.clone();
                tokio::spawn(async move {
                    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
                    s.set_nodelay(true).expect("nodelay");
                    let offset = per_conn_interval.mul_f64(c as f64 / connections as f64);
                    let mut latencies = Vec::new();
                    let mut buf = vec![0u8; 65536];
                    let mut previous_done = start;
                    for k in 0u32.. {
                        let scheduled = start + offset + per_conn_interval * k;
                        if scheduled >= end {
                            break;
                        }
                        tokio::time::sleep_until(scheduled).await;
                        let sent = tokio::time::Instant::now();
                        s.write_all(&request).await.expect("send");
                        read_response(&mut s, &mut buf).await;
                        // A request held back by the previous response counts from its scheduled
                        // time (a slow server delays the next request: coordinated omission);
                        // otherwise from when it was sent, so the timer's millisecond granularity
                        // is not counted as latency.
                        let from = if previous_done > scheduled { scheduled } else { sent };
                        previous_done = tokio::time::Instant::now();
                        latencies.push((previous_done - from).as_secs_f64() * 1000.0);
                    }
                    latencies
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.expect("worker"));
        }
        all
    });
    all.sort_by(f64::total_cmp);
    LoadResult {
        requests: all.len() as u64,
        per_second: all.len() as f64 / seconds as f64,
        p50_ms: percentile(&all, 0.50),
        p99_ms: percentile(&all, 0.99),
    }
}

/// Reads one Content-Length-framed HTTP response.
async fn read_response(s: &mut tokio::net::TcpStream, buf: &mut [u8]) {
    let mut got = Vec::new();
    loop {
        let n = s.read(buf).await.expect("read response");
        assert!(n > 0, "server closed the connection");
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return;
            }
        }
    }
}

pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// redis-benchmark GET+SET with `pipeline` commands per round trip.
pub fn redis_benchmark(port: u16, pipeline: u32, requests: u32) -> LoadResult {
    let text = output(Command::new("redis-benchmark").args([
        "-p",
        &port.to_string(),
        "-t",
        "set,get",
        "-n",
        &requests.to_string(),
        "-c",
        "16",
        "-P",
        &pipeline.to_string(),
        "--csv",
    ]));
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let rows: Vec<Vec<f64>> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').skip(1).map(|v| v.trim_matches('"').parse().unwrap_or(f64::NAN)).collect())
        .collect();
    assert_eq!(rows.len(), 2, "redis-benchmark output:\n{text}");
    let total_seconds: f64 = rows.iter().map(|r| requests as f64 / r[0]).sum();
    LoadResult {
        requests: 2 * requests as u64,
        per_second: 2.0 * requests as f64 / total_seconds,
        p50_ms: rows.iter().map(|r| r[3]).fold(0.0, f64::max),
        p99_ms: rows.iter().map(|r| r[5]).fold(0.0, f64::max),
    }
}

/// pgbench -S -M extended; latencies from its per-transaction log.
pub fn pgbench(port: u16, seconds: u32, password: &str, dir: &std::path::Path) -> LoadResult {
    let prefix = dir.join("pgbench_log");
    let text = output(
        Command::new("pgbench")
            .args(["-S", "-M", "extended", "-c", "4", "-j", "2", "-T", &seconds.to_string(), "-n", "-l"])
            .arg(format!("--log-prefix={}", prefix.display()))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "postgres"])
            .env("PGPASSWORD", password),
    );
    let mut latencies = Vec::new();
    for entry in std::fs::read_dir(dir).expect("pgbench log dir").flatten() {
        if entry.file_name().to_string_lossy().starts_with("pgbench_log") {
            let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
            // client_id transaction_no time(us) script_no time_epoch time_us
            latencies
                .extend(log.lines().filter_map(|l| l.split(' ').nth(2)?.parse::<f64>().ok()).map(|us| us / 1000.0));
            let _ = std::fs::remove_file(entry.path());
        }
    }
    latencies.sort_by(f64::total_cmp);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(|v| v.trim().split(' ').next().unwrap_or("").to_owned())
    };
    let requests: u64 = field("number of transactions actually processed:")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("pgbench output:\n{text}"));
    let tps: f64 = field("tps =").and_then(|v| v.parse().ok()).unwrap_or(0.0);
    LoadResult { requests, per_second: tps, p50_ms: percentile(&latencies, 0.5), p99_ms: percentile(&latencies, 0.99) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
    }
}
