//! Real clients: curl, and a raw socket client that pipelines requests in one write.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::Duration,
};

/// `curl` with these URLs on one command line: curl reuses one keep-alive connection.
pub fn curl(args: &[&str], urls: &[String]) -> String {
    let out = Command::new("curl").arg("-sS").args(args).args(urls).output().expect("run curl");
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes all `requests` in a single write() and reads until `expected_responses` status lines
/// have arrived. Returns the raw response bytes.
pub fn pipelined(port: u16, requests: &[String], expected_responses: usize) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let all: String = requests.concat();
    s.write_all(all.as_bytes()).expect("pipelined write");
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while count_status_lines(&got) < expected_responses {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn count_status_lines(b: &[u8]) -> usize {
    b.windows(9).filter(|w| w == b"HTTP/1.1 " || w == b"HTTP/1.0 ").count()
}

/// A keep-alive connection for sending requests one at a time.
pub struct KeepAlive {
    stream: TcpStream,
    port: u16,
}

impl KeepAlive {
    pub fn connect(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        Self { stream, port }
    }

    /// Sends one GET and reads its whole (Content-Length framed) response.
    pub fn get(&mut self, path: &str) -> String {
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n", self.port);
        self.stream.write_all(req.as_bytes()).expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = self.stream.read(&mut buf).expect("read");
            assert!(n > 0, "connection closed early");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some(head_end) = text.find("\r\n\r\n") {
                let len: usize = text[..head_end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if got.len() >= head_end + 4 + len {
                    return text;
                }
            }
        }
    }
}

/// A shell that sonde traces (`--pid`), running client commands as its children so they are
/// traced from their first syscall (short-lived clients like psql could not be discovered in
/// time otherwise).
pub struct Launcher {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Launcher {
    pub fn start() -> Self {
        use std::process::Stdio;
        let mut child = std::os::unix::process::CommandExt::process_group(&mut Command::new("bash"), 0)
            .args(["-c", "while IFS= read -r cmd; do bash -c \"$cmd\" >/dev/null 2>&1; echo \"rc=$?\"; done"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start launcher shell");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        Self { child, stdin, stdout }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs one shell command line to completion; returns its exit code.
    pub fn run(&mut self, cmd: &str) -> i32 {
        use std::io::BufRead;
        writeln!(self.stdin, "{cmd}").expect("send command");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read result");
        line.trim().strip_prefix("rc=").and_then(|c| c.parse().ok()).unwrap_or(-1)
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        crate::servers::stop_group(&mut self.child);
    }
}

/// Prometheus's HTTP API: GET `path` (e.g. `/api/v1/query?...`) on `port`, parsed JSON.
pub fn prometheus_api(port: u16, path: &str, params: &[(&str, &str)]) -> serde_json::Value {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-G", &format!("http://127.0.0.1:{port}{path}")]);
    for (k, v) in params {
        cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
    }
    let out = cmd.output().expect("run curl");
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("Prometheus answered non-JSON ({e})"))
}

/// An instant PromQL query: (labels, value) for each element of the vector result.
pub fn prometheus_query(port: u16, expr: &str) -> Vec<(serde_json::Value, f64)> {
    let v = prometheus_api(port, "/api/v1/query", &[("query", expr)]);
    assert_eq!(v["status"], "success", "query {expr} failed: {v}");
    v["data"]["result"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|e| (e["metric"].clone(), e["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN)))
                .collect()
        })
        .unwrap_or_default()
}

/// GETs every URL with one curl, up to `parallel` connections at once (each its own connection).
pub fn curl_parallel(urls: &[String], parallel: usize) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--no-progress-meter", "--parallel", "--parallel-immediate", "--parallel-max"]);
    cmd.arg(parallel.to_string());
    for url in urls {
        cmd.args(["-o", "/dev/null", url]);
    }
    assert!(cmd.status().expect("run curl").success(), "curl --parallel failed");
}

/// sonde's (or any) Prometheus text exposition.
pub fn scrape(port: u16) -> String {
    curl(&[], &[format!("http://127.0.0.1:{port}/metrics")])
}

/// The value of one sample, named exactly as exposed (`name` or `name{label="v"}`).
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

/// What wrk reported.
#[derive(Clone, Debug, Default)]
pub struct WrkReport {
    pub requests: u64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Answers that were not 2xx or 3xx.
    pub non_2xx: u64,
}

/// wrk (one thread) with `connections` keep-alive connections for `seconds`.
pub fn wrk(url: &str, connections: u32, seconds: u32) -> WrkReport {
    let out = Command::new("wrk")
        .args(["-t", "1", "-c", &connections.to_string(), "-d", &format!("{seconds}s"), "--latency", url])
        .output()
        .expect("run wrk (apt-get install wrk, or cargo xtask setup)");
    assert!(out.status.success(), "wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut r = WrkReport::default();
    for line in text.lines().map(str::trim) {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["50%", v] => r.p50_ms = wrk_duration_ms(v),
            ["99%", v] => r.p99_ms = wrk_duration_ms(v),
            ["Requests/sec:", v] => r.per_second = v.parse().unwrap_or(0.0),
            ["Non-2xx", "or", "3xx", "responses:", n] => r.non_2xx = n.parse().unwrap_or(u64::MAX),
            [n, "requests", "in", ..] => r.requests = n.parse().unwrap_or(0),
            _ => {}
        }
    }
    assert!(r.requests > 0, "wrk reported no requests:\n{text}");
    r
}

/// `12.5us`, `3.2ms`, `1.01s` -> milliseconds.
fn wrk_duration_ms(text: &str) -> f64 {
    let (num, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(text.len()));
    let v: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => f64::NAN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_units() {
        assert_eq!(wrk_duration_ms("250.00us"), 0.25);
        assert_eq!(wrk_duration_ms("1.50ms"), 1.5);
        assert_eq!(wrk_duration_ms("2.00s"), 2000.0);
    }
}
