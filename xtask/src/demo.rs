//! `cargo xtask demo`: two HTTP services on loopback (a frontend that calls a backend), traced
//! by the real sonde binary, with spans printed as they finish and the RED metrics sonde serves
//! to Prometheus summarised at the end. Stops by itself.

use std::{
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

struct Killed(Child);

impl Drop for Killed {
    /// Stops the child's whole process group: SIGTERM, then SIGKILL after a grace period.
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).stderr(Stdio::null()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && self.0.try_wait().ok().flatten().is_none() {
            sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_listening(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("demo service on port {port} did not start");
        }
        sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A throwaway PostgreSQL 15 cluster (it refuses to run as root: it runs as `postgres`).
fn start_postgres(dir: &std::path::Path, port: u16) -> Result<Killed> {
    let bin = "/usr/lib/postgresql/15/bin";
    std::fs::create_dir_all(dir)?;
    crate::run(Command::new("chown").arg("postgres").arg(dir))?;
    let data = dir.join("data");
    crate::run(
        Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{bin}/initdb"), "-A", "trust", "-U", "postgres", "-D"])
            .arg(&data)
            .stdout(Stdio::null()),
    )?;
    let child = Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{bin}/postgres"), "-D"])
        .arg(&data)
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-k"])
        .arg(dir)
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting postgres")?;
    Ok(Killed(child))
}

pub fn run(seconds: u64) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        bail!("the demo loads eBPF programs: run it as root (sudo -E cargo xtask demo)");
    }
    let root = crate::root();
    let fixtures = root.join("tests/fixtures");
    let [frontend_port, orders_port, pg_port, redis_port] = [free_port()?, free_port()?, free_port()?, free_port()?];
    let work = std::env::temp_dir().join(format!("sonde-demo-{}", std::process::id()));
    let _pg = start_postgres(&work.join("pg"), pg_port)?;
    let _redis = Killed(
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .process_group(0)
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server")?,
    );
    wait_listening(pg_port)?;
    wait_listening(redis_port)?;
    let python = |script: &str, args: Vec<String>| -> Result<Killed> {
        Ok(Killed(
            Command::new("python3")
                .arg(fixtures.join(script))
                .args(args)
                .process_group(0)
                .stdout(Stdio::null())
                .spawn()
                .context("starting python3")?,
        ))
    };
    let _orders = python(
        "app.py",
        // --lazy: the database connections open with the first request, when sonde sees both
        // ends from their first byte, so the database spans join the request's trace.
        vec![
            orders_port.to_string(),
            pg_port.to_string(),
            redis_port.to_string(),
            "unused-with-trust-auth".into(),
            "--lazy".into(),
        ],
    )?;
    let _frontend =
        python("http_server.py", vec![frontend_port.to_string(), "--backend".into(), orders_port.to_string()])?;
    wait_listening(orders_port)?;
    wait_listening(frontend_port)?;

    let config = work.join("sonde.yaml");
    std::fs::write(
        &config,
        format!(
            "discovery:\n  - service.name: frontend\n    open_ports: {frontend_port}\n  - service.name: orders\n    open_ports: {orders_port}\n  - service.name: postgres\n    open_ports: {pg_port}\n  - service.name: redis\n    open_ports: {redis_port}\n"
        ),
    )?;
    let metrics_port = free_port()?;
    println!(
        "==> demo: frontend :{frontend_port} -> orders :{orders_port} -> PostgreSQL :{pg_port} + Redis :{redis_port}; sonde traces all four for {seconds}s\n==> metrics meanwhile: curl http://127.0.0.1:{metrics_port}/metrics\n"
    );
    let mut sonde = Killed(
        Command::new(root.join("target/release/sonde"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--print")
            .arg("text")
            .arg("--prometheus-port")
            .arg(metrics_port.to_string())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting target/release/sonde")?,
    );
    wait_ready(&mut sonde)?;

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut i = 0u64;
    while Instant::now() < deadline {
        let path = match i % 4 {
            0 | 1 => format!("/call/{}", i % 100 + 1),
            2 => format!("/users/{i}?session=secret{i}"),
            _ => "/status/503".to_string(),
        };
        let traceparent = format!("traceparent: 00-{:032x}-{:016x}-01", 0xdecaf_u128 << 64 | i as u128, i + 1);
        let _ = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-H", &traceparent])
            .arg(format!("http://127.0.0.1:{frontend_port}{path}"))
            .status();
        i += 1;
        sleep(Duration::from_millis(500));
    }
    let metrics = Command::new("curl").args(["-s", &format!("http://127.0.0.1:{metrics_port}/metrics")]).output()?;
    print_red_summary(&String::from_utf8_lossy(&metrics.stdout));
    let pid = sonde.0.id();
    let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
    let _ = sonde.0.wait();
    println!(
        "\n==> demo done: {i} requests made. Run it against your own services with `target/release/sonde run --open-ports PORT`."
    );
    drop((_frontend, _orders, _redis, _pg));
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// One line per series of the request-count histograms sonde serves: rate, errors, duration;
/// then the service graph's edges.
fn print_red_summary(exposition: &str) {
    print_histograms(exposition);
    println!("\n==> service graph (traces_service_graph_request_total): who called whom, how often");
    for line in exposition.lines().filter(|l| l.starts_with("traces_service_graph_request_total{")) {
        if let Some((labels, count)) = line.rsplit_once(' ') {
            let labels = labels.trim_start_matches("traces_service_graph_request_total");
            println!("  {count:>5}  {labels}");
        }
    }
}

fn print_histograms(exposition: &str) {
    println!("\n==> RED metrics from sonde's Prometheus endpoint (count, mean duration per series):");
    for family in [
        "http_server_request_duration_seconds",
        "http_client_request_duration_seconds",
        "db_client_operation_duration_seconds",
    ] {
        for line in exposition.lines().filter(|l| l.starts_with(&format!("{family}_count{{"))) {
            let Some((labels, count)) = line.rsplit_once(' ') else { continue };
            let labels = labels.trim_start_matches(&format!("{family}_count"));
            let sum_line = format!("{family}_sum{labels} ");
            let sum: f64 =
                exposition.lines().find_map(|l| l.strip_prefix(&sum_line)).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let count: f64 = count.parse().unwrap_or(0.0);
            let mean_ms = if count > 0.0 { sum / count * 1000.0 } else { 0.0 };
            let shown: Vec<&str> = labels
                .trim_matches(|c| c == '{' || c == '}')
                .split(',')
                .filter(|kv| {
                    !kv.starts_with("service_instance_id")
                        && !kv.starts_with("url_scheme")
                        && !kv.starts_with("network_protocol")
                })
                .collect();
            println!("  {family:<38} {:>5} x {mean_ms:>8.2} ms  {}", count, shown.join(" "));
        }
    }
}

/// Forwards sonde's log to our stderr and returns once discovery has run (traffic sent before
/// that would not be traced).
fn wait_ready(sonde: &mut Killed) -> Result<()> {
    use std::io::BufRead;
    let stderr = sonde.0.stderr.take().context("sonde stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if line.contains("waiting for more") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60)).context("sonde did not start tracing within 60s")
}

unsafe extern "C" {
    fn geteuid() -> u32;
}
