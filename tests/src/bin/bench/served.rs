//! What the server itself says it served, read before sonde starts and after it stops, so the
//! "one span per request" verdict compares spans with the server's count. The load generators'
//! own counts differ from it: wrk stops with a request in flight on each connection (served and
//! traced, not counted by wrk), redis-benchmark sends CONFIG GET before it starts.
//!
//! Each reading is itself a request, counted by the next reading: see [`between`].

use std::process::Command;

/// How to ask a server for its count.
#[derive(Clone, Debug)]
pub enum Counter {
    /// nginx `stub_status` at this URL: the `requests` total, which counts the status request.
    NginxStatus(String),
    /// Redis `INFO stats` on this port: `total_commands_processed`, which does not count the
    /// INFO being answered.
    Redis(u16),
}

impl Counter {
    /// Requests served before the one making this reading.
    pub fn read(&self) -> u64 {
        match self {
            Counter::NginxStatus(url) => {
                let out = run("curl", &["-sk", "--max-time", "5", url]);
                // "Active connections: N\nserver accepts handled requests\n A H R\n..."
                let totals = out.lines().nth(2).unwrap_or_default();
                let requests = totals.split_whitespace().nth(2).and_then(|r| r.parse::<u64>().ok());
                requests.unwrap_or_else(|| panic!("nginx stub_status at {url}: unexpected reply {out:?}")) - 1
            }
            Counter::Redis(port) => {
                let out = run("redis-cli", &["-p", &port.to_string(), "INFO", "stats"]);
                out.lines()
                    .find_map(|l| l.strip_prefix("total_commands_processed:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or_else(|| panic!("redis INFO stats on port {port}: unexpected reply {out:?}"))
            }
        }
    }
}

/// Requests served between two readings, without the first reading's own request.
pub fn between(before: u64, after: u64) -> u64 {
    after.saturating_sub(before).saturating_sub(1)
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
