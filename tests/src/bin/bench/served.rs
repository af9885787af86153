//! What the server itself says it served, read before sonde starts and after it stops, so the
//! "one span per request" verdict compares spans with the server's count. The load generators'
//! own counts differ from it: wrk stops with a request in flight on each connection (served and
//! traced, not counted by wrk), redis-benchmark sends CONFIG GET before it starts.
//!
//! A reading can itself be a request that the next reading counts: see [`Counter::between`].

use std::process::Command;

/// Requests a server finished, as it counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count {
    /// Answered.
    pub answered: u64,
    /// Handled (their own calls made) but not answered, or not completely: the client had gone.
    /// Each makes every span of a request except the server span.
    pub unanswered: u64,
}

impl Count {
    /// Spans these requests make, when a request makes `per_request` (its server span and
    /// `per_request - 1` client spans).
    pub fn spans(self, per_request: u64) -> u64 {
        self.answered * per_request + self.unanswered * per_request.saturating_sub(1)
    }
}

impl std::iter::Sum for Count {
    fn sum<I: Iterator<Item = Count>>(iter: I) -> Self {
        iter.fold(Count::default(), |a, b| Count {
            answered: a.answered + b.answered,
            unanswered: a.unanswered + b.unanswered,
        })
    }
}

/// How to ask a server for its count.
#[derive(Clone, Debug)]
pub enum Counter {
    /// nginx `stub_status` at this URL: the `requests` total, which counts the status request;
    /// and the log of requests nginx could not complete (`servers::NGINX_INCOMPLETE_LOG`).
    NginxStatus(String, std::path::PathBuf),
    /// Redis `INFO stats` on this port: `total_commands_processed`, which does not count the
    /// INFO being answered.
    Redis(u16),
    /// PostgreSQL on this port, with this password: `sum(calls)` of `pg_stat_statements`,
    /// which does not count the query being answered (see `servers::postgres_counting_statements`).
    Postgres(u16, &'static str),
    /// The Python service (tests/fixtures/app.py) at this base URL: its `/served` counts of
    /// orders answered and unanswered, which never count the `/served` requests themselves.
    App(String),
}

impl Counter {
    /// Requests served before the one making this reading.
    pub fn read(&self) -> Count {
        let answered = |answered| Count { answered, unanswered: 0 };
        let number = |what: &str, text: &str| {
            text.trim().parse::<u64>().unwrap_or_else(|_| panic!("{what}: unexpected reply {text:?}"))
        };
        match self {
            Counter::NginxStatus(url, incomplete_log) => {
                let out = run("curl", &["-sk", "--max-time", "5", url]);
                // "Active connections: N\nserver accepts handled requests\n A H R\n..."
                let totals = out.lines().nth(2).unwrap_or_default();
                let requests = totals.split_whitespace().nth(2).and_then(|r| r.parse::<u64>().ok());
                let requests =
                    requests.unwrap_or_else(|| panic!("nginx stub_status at {url}: unexpected reply {out:?}"));
                // Requests begun but not completed (the client left mid-response) have no span.
                let log = std::fs::read_to_string(incomplete_log).unwrap_or_default();
                let incomplete = log.lines().count() as u64;
                Count { answered: requests - 1 - incomplete, unanswered: incomplete }
            }
            Counter::Redis(port) => {
                let out = run("redis-cli", &["-p", &port.to_string(), "INFO", "stats"]);
                let total = out.lines().find_map(|l| l.strip_prefix("total_commands_processed:"));
                answered(number("redis INFO stats", total.unwrap_or_default()))
            }
            Counter::Postgres(port, password) => {
                let port = port.to_string();
                let args = ["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-tA", "-c"];
                let query = "SELECT sum(calls) FROM pg_stat_statements";
                let out =
                    run_with_env("psql", &[&args[..], &[query, "postgres"]].concat(), &[("PGPASSWORD", password)]);
                answered(number("pg_stat_statements", &out))
            }
            Counter::App(base) => {
                let out = run("curl", &["-s", "--max-time", "5", &format!("{base}/served")]);
                let (done, gone) = out.split_once(' ').unwrap_or((&out, ""));
                Count { answered: number("app /served", done), unanswered: number("app /served", gone) }
            }
        }
    }

    /// Requests served between two readings: without the first reading's own request, where
    /// the second one counts it.
    pub fn between(&self, before: Count, after: Count) -> Count {
        let readings_counted = match self {
            Counter::NginxStatus(..) | Counter::Redis(_) | Counter::Postgres(..) => 1,
            Counter::App(_) => 0,
        };
        Count {
            answered: after.answered.saturating_sub(before.answered).saturating_sub(readings_counted),
            unanswered: after.unanswered.saturating_sub(before.unanswered),
        }
    }
}

fn run(program: &str, args: &[&str]) -> String {
    run_with_env(program, args, &[])
}

fn run_with_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
