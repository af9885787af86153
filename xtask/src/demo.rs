//! `cargo xtask demo`: two HTTP services on loopback (a frontend that calls a backend), traced
//! by the real sonde binary, with spans printed as they finish. Stops by itself.

use std::{
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
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

pub fn run(seconds: u64) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        bail!("the demo loads eBPF programs: run it as root (sudo -E cargo xtask demo)");
    }
    let root = crate::root();
    let server = root.join("tests/fixtures/http_server.py");
    let (backend_port, frontend_port) = (free_port()?, free_port()?);
    let python = |args: Vec<String>| -> Result<Killed> {
        Ok(Killed(
            Command::new("python3")
                .arg(&server)
                .args(args)
                .stdout(Stdio::null())
                .spawn()
                .context("starting python3")?,
        ))
    };
    let _backend = python(vec![backend_port.to_string()])?;
    let _frontend = python(vec![frontend_port.to_string(), "--backend".into(), backend_port.to_string()])?;
    wait_listening(backend_port)?;
    wait_listening(frontend_port)?;

    let config = std::env::temp_dir().join(format!("sonde-demo-{}.yaml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "discovery:\n  - service.name: frontend\n    open_ports: {frontend_port}\n  - service.name: backend\n    open_ports: {backend_port}\n"
        ),
    )?;
    println!(
        "==> demo: frontend on 127.0.0.1:{frontend_port} calls backend on 127.0.0.1:{backend_port}; sonde traces both for {seconds}s\n"
    );
    let mut sonde = Killed(
        Command::new(root.join("target/release/sonde"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--print")
            .arg("text")
            .stderr(Stdio::piped())
            .spawn()
            .context("starting target/release/sonde")?,
    );
    wait_ready(&mut sonde)?;

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut i = 0u64;
    while Instant::now() < deadline {
        let path = match i % 4 {
            0 => format!("/call/{i}"),
            1 => format!("/users/{i}?session=secret{i}"),
            2 => "/status/404".to_string(),
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
    let pid = sonde.0.id();
    let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
    let _ = sonde.0.wait();
    let _ = std::fs::remove_file(&config);
    println!(
        "\n==> demo done: {i} requests made. Run it against your own services with `target/release/sonde run --open-ports PORT`."
    );
    Ok(())
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
