//! Real servers for the tests, each on a loopback port in a temp directory, stopped on drop.

use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{TempDir, wait_listening};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// A child process killed (with its process group) on drop.
pub struct Server {
    pub child: Child,
    pub port: u16,
    dir: Option<TempDir>,
}

impl Server {
    /// A server started by the caller (listening on `port`), stopped like the others on drop.
    pub fn from_child(child: Child, port: u16) -> Self {
        Self { child, port, dir: None }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A file in the server's own directory, where it has one.
    pub fn file(&self, name: &str) -> Option<std::path::PathBuf> {
        self.dir.as_ref().map(|d| d.path().join(name))
    }
}

/// The file where nginx servers started without an access log record the requests they could not
/// complete (`$request_completion` empty: the client went away mid-response).
pub const NGINX_INCOMPLETE_LOG: &str = "incomplete.log";

impl Drop for Server {
    /// Stops the whole process group (nginx workers, PostgreSQL under runuser): SIGTERM, then
    /// SIGKILL if it has not exited within five seconds.
    fn drop(&mut self) {
        stop_group(&mut self.child);
    }
}

pub fn stop_group(child: &mut Child) {
    let group = format!("-{}", child.id());
    let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
    let exited = crate::wait_for(Duration::from_secs(5), || child.try_wait().ok().flatten());
    let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
    if exited.is_none() {
        let _ = child.wait();
    }
}

/// tests/fixtures/http_server.py on `port`, optionally calling a backend.
pub fn python_http(port: u16, backend: Option<u16>) -> Server {
    let mut cmd = Command::new("python3");
    cmd.arg(fixture("http_server.py")).arg(port.to_string());
    if let Some(b) = backend {
        cmd.arg("--backend").arg(b.to_string());
    }
    let child =
        cmd.process_group(0).stdin(Stdio::null()).stdout(Stdio::null()).spawn().expect("start python3 http server");
    wait_listening(port);
    Server { child, port, dir: None }
}

/// tests/fixtures/app.py on `port`: an HTTP service that queries PostgreSQL and Redis per
/// request. `lazy`: its database connections open with the first request, not at start.
pub fn python_app_with(port: u16, pg_port: u16, redis_port: u16, lazy: bool) -> Server {
    let mut cmd = Command::new("python3");
    cmd.arg(fixture("app.py")).args([port.to_string(), pg_port.to_string(), redis_port.to_string()]);
    cmd.arg(PG_PASSWORD);
    if lazy {
        cmd.arg("--lazy");
    }
    let child = cmd.process_group(0).stdin(Stdio::null()).stdout(Stdio::null()).spawn().expect("start app.py");
    wait_listening(port);
    Server { child, port, dir: None }
}

pub fn python_app(port: u16, pg_port: u16, redis_port: u16) -> Server {
    python_app_with(port, pg_port, redis_port, false)
}

/// tests/fixtures/header_recorder.py on `port`, appending what it receives to `log`.
pub fn header_recorder(port: u16, log: &std::path::Path) -> Server {
    let child = Command::new("python3")
        .arg(fixture("header_recorder.py"))
        .arg(port.to_string())
        .arg(log)
        .process_group(0)
        .stdin(Stdio::null())
        .spawn()
        .expect("start header_recorder.py");
    wait_listening(port);
    Server { child, port, dir: None }
}

/// tests/fixtures/http_server.py serving HTTPS (Python's ssl module, libssl.so.3).
pub fn python_https(port: u16) -> Server {
    let dir = TempDir::new("pyhttps");
    let (cert, key) = tls_cert(dir.path());
    let child = Command::new("python3")
        .arg(fixture("http_server.py"))
        .arg(port.to_string())
        .arg("--tls")
        .arg(&cert)
        .arg(&key)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start python3 https server");
    wait_listening(port);
    Server { child, port, dir: Some(dir) }
}

/// A Node.js HTTPS server (OpenSSL linked statically into node).
pub fn node_https(port: u16) -> Server {
    node_tls_server("node_https.js", port)
}

/// A Node.js HTTP/2 server over TLS (tests/fixtures/node_h2.js).
pub fn node_h2(port: u16) -> Server {
    node_tls_server("node_h2.js", port)
}

/// `node FIXTURE server PORT CERT KEY` with a fresh self-signed certificate.
fn node_tls_server(script: &str, port: u16) -> Server {
    let dir = TempDir::new("node-tls");
    let (cert, key) = tls_cert(dir.path());
    let child = Command::new("node")
        .arg(fixture(script))
        .args(["server", &port.to_string()])
        .arg(&cert)
        .arg(&key)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start node");
    wait_listening(port);
    Server { child, port, dir: Some(dir) }
}

/// The grpcio server of tests/fixtures/grpc_app.py (service demo.Greeter) on `port`.
pub fn grpc(port: u16) -> Server {
    python_fixture(
        "grpc_app.py",
        &["serve", &port.to_string()],
        port,
        "start the grpcio server (pip install grpcio, or cargo xtask setup)",
    )
}

/// The grpcio relay of tests/fixtures/grpc_app.py on `port`: each demo.Relay call is forwarded
/// to the same method on `backend` (a [`grpc`] server) over one channel.
pub fn grpc_relay(port: u16, backend: u16) -> Server {
    python_fixture("grpc_app.py", &["relay", &port.to_string(), &backend.to_string()], port, "start the grpcio relay")
}

/// The HTTP/1.1 server of tests/fixtures/h2c_upgrade.py on `port`, which switches to HTTP/2
/// when a request asks (`Upgrade: h2c`): every path 200, `/missing` 404.
pub fn h2c_upgrade(port: u16) -> Server {
    h2c_upgrade_with(port, &[])
}

/// [`h2c_upgrade`] with the script's extra arguments (`block-in-accept`).
pub fn h2c_upgrade_with(port: u16, args: &[&str]) -> Server {
    let port_text = port.to_string();
    let all: Vec<&str> = std::iter::once(port_text.as_str()).chain(args.iter().copied()).collect();
    python_fixture("h2c_upgrade.py", &all, port, "start the h2c server (pip install h2, or cargo xtask setup)")
}

/// A Python server from tests/fixtures, in its own process group, once it listens on `port`.
fn python_fixture(script: &str, args: &[&str], port: u16, what: &str) -> Server {
    let child = Command::new("python3")
        .arg(fixture(script))
        .args(args)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect(what);
    wait_listening(port);
    Server { child, port, dir: None }
}

/// nginx with HTTP/2 on a cleartext listener (`plain`, prior knowledge) and on a TLS listener
/// (`tls`, ALPN h2): `/index.html`, `/missing` (404), `/teapot` (418).
pub fn nginx_h2(plain: u16, tls: u16) -> Server {
    let dir = TempDir::new("nginx-h2");
    let root = dir.path().join("www");
    std::fs::create_dir_all(&root).expect("docroot");
    std::fs::write(root.join("index.html"), b"<html>hello over h2</html>\n").expect("index");
    let (cert, key) = tls_cert(dir.path());
    let d = dir.path().display();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  server {{\n    listen 127.0.0.1:{plain} http2;\n    listen 127.0.0.1:{tls} ssl http2;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    root {root};\n    location /teapot {{ return 418 \"short and stout\"; }}\n  }}\n}}\n",
        root = root.display(),
        cert = cert.display(),
        key = key.display(),
    );
    let server = start_nginx(dir, &conf, plain);
    wait_listening(tls);
    server
}

/// nginx (master + 2 workers) serving a temp docroot on `port`: `/index.html` (a small file),
/// `/big.bin` (1 MiB, sent with sendfile), `/missing` (404), `/teapot` (418 from `return`).
pub fn nginx(port: u16) -> Server {
    nginx_with(port, None)
}

/// A self-signed certificate and key for `localhost`, made by the openssl CLI in `dir`.
pub fn tls_cert(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl (apt-get install openssl, or cargo xtask setup)");
    assert!(status.success(), "openssl req failed");
    (cert, key)
}

/// nginx as above; with `tls` it serves HTTPS with a fresh self-signed certificate.
pub fn nginx_with(port: u16, tls: Option<()>) -> Server {
    nginx_logging(port, tls, None)
}

/// nginx as above, writing its access log (the default `combined` format) to `access_log`.
pub fn nginx_logging(port: u16, tls: Option<()>, access_log: Option<&std::path::Path>) -> Server {
    let dir = TempDir::new("nginx");
    let root = dir.path().join("www");
    std::fs::create_dir_all(&root).expect("docroot");
    std::fs::write(root.join("index.html"), b"<html>hello from nginx</html>\n").expect("index");
    std::fs::write(root.join("big.bin"), vec![b'x'; 1 << 20]).expect("big file");
    let d = dir.path().display();
    let listen = match tls {
        Some(()) => {
            let (cert, key) = tls_cert(dir.path());
            format!(
                "listen 127.0.0.1:{port} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};",
                cert.display(),
                key.display()
            )
        }
        None => format!("listen 127.0.0.1:{port};"),
    };
    // Without an access log, only the requests nginx could not complete are logged (the
    // benchmark counts them: they have no response, so no span).
    let incomplete = match access_log {
        Some(_) => String::new(),
        None => format!("    access_log {d}/{NGINX_INCOMPLETE_LOG} combined if=$incomplete;\n"),
    };
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log {access};\n  map $request_completion $incomplete {{ \"\" 1; default 0; }}\n  sendfile on;\n  keepalive_requests 100000;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  server {{\n    {listen}\n    root {root};\n    location /teapot {{ return 418 \"short and stout\"; }}\n    location = /stub_status {{ stub_status; }}\n{incomplete}  }}\n}}\n",
        root = root.display(),
        access = access_log.map_or("off".to_string(), |p| p.display().to_string()),
    );
    start_nginx(dir, &conf, port)
}

/// nginx as a reverse proxy on `port`: one worker (an event loop serving every connection on one
/// thread) forwarding every path unchanged to `backend` over kept-alive upstream connections.
pub fn nginx_proxy(port: u16, backend: u16) -> Server {
    let dir = TempDir::new("nginx-proxy");
    let d = dir.path().display();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  upstream backend {{ server 127.0.0.1:{backend}; keepalive 16; }}\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://backend;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
    );
    start_nginx(dir, &conf, port)
}

/// Runs nginx with `conf` (written into `dir`, its prefix) until it listens on `port`.
fn start_nginx(dir: TempDir, conf: &str, port: u16) -> Server {
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("nginx.conf");
    let child = Command::new("/usr/sbin/nginx")
        .arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(dir.path())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx (apt-get install nginx-light, or run cargo xtask setup)");
    wait_listening(port);
    Server { child, port, dir: Some(dir) }
}

/// A child process (and its process group) stopped when this is dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        stop_group(&mut self.0);
    }
}

/// Password of the test PostgreSQL's superuser: md5 auth makes it cross the wire, so the tests
/// can check it never appears in what sonde exports.
pub const PG_PASSWORD: &str = "pgS3cretPass";

/// PostgreSQL 15 in a temp directory on `port`, run as the `postgres` user (it refuses root),
/// md5 authentication, with pgbench tables initialized (scale 1).
pub fn postgres(port: u16) -> Server {
    postgres_with(port, false)
}

/// PostgreSQL as above; with `ssl` it also accepts TLS (self-signed certificate).
pub fn postgres_with(port: u16, ssl: bool) -> Server {
    postgres_configured(port, ssl, &[])
}

/// PostgreSQL as above, counting every statement it executes in `pg_stat_statements`
/// (`SELECT sum(calls) FROM pg_stat_statements`): the benchmark compares spans with it.
pub fn postgres_counting_statements(port: u16) -> Server {
    let server = postgres_configured(port, false, &["shared_preload_libraries=pg_stat_statements"]);
    let status = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-q", "-c"])
        .arg("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .arg("postgres")
        .env("PGPASSWORD", PG_PASSWORD)
        .stdout(Stdio::null())
        .status()
        .expect("psql");
    assert!(status.success(), "CREATE EXTENSION pg_stat_statements failed");
    server
}

/// PostgreSQL with each of `settings` (`name=value`) passed as `-c`.
fn postgres_configured(port: u16, ssl: bool, settings: &[&str]) -> Server {
    let dir = TempDir::new("pg");
    let run_as = |args: &[&str]| {
        let status = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("runuser");
        assert!(status.success(), "{args:?} failed");
    };
    let _ = Command::new("chown").args(["-R", "postgres"]).arg(dir.path()).status();
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, PG_PASSWORD).expect("pwfile");
    let _ = Command::new("chown").arg("postgres").arg(&pwfile).status();
    let data = dir.path().join("data");
    let bin = "/usr/lib/postgresql/15/bin";
    run_as(&[
        &format!("{bin}/initdb"),
        "-D",
        data.to_str().unwrap_or(""),
        "-A",
        "md5",
        "-U",
        "postgres",
        "--pwfile",
        pwfile.to_str().unwrap_or(""),
    ]);
    let mut ssl_args: Vec<String> = Vec::new();
    if ssl {
        let (cert, key) = tls_cert(dir.path());
        let _ = Command::new("chown").arg("postgres").arg(&cert).arg(&key).status();
        let _ = Command::new("chmod").arg("600").arg(&key).status();
        ssl_args = vec![
            "-c".into(),
            "ssl=on".into(),
            "-c".into(),
            format!("ssl_cert_file={}", cert.display()),
            "-c".into(),
            format!("ssl_key_file={}", key.display()),
        ];
    }
    let child = Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{bin}/postgres"), "-D"])
        .arg(&data)
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
        .args(&ssl_args)
        .args(settings.iter().flat_map(|setting| ["-c", setting]))
        .arg("-k")
        .arg(dir.path())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start postgres");
    wait_listening(port);
    let status = Command::new("pgbench")
        .args(["-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "postgres"])
        .env("PGPASSWORD", PG_PASSWORD)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("pgbench -i");
    assert!(status.success(), "pgbench -i failed");
    Server { child, port, dir: Some(dir) }
}

/// redis-server 7 on `port`, no persistence.
pub fn redis(port: u16) -> Server {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start redis-server (apt-get install redis-server, or cargo xtask setup)");
    wait_listening(port);
    Server { child, port, dir: None }
}

/// Debian's Prometheus on `port`, scraping `targets` every second, with `rule_files` loaded.
pub fn prometheus(port: u16, targets: &[String], rule_files: &[PathBuf]) -> Server {
    let dir = TempDir::new("prometheus");
    let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    let rules: Vec<String> = rule_files.iter().map(|r| format!("  - '{}'\n", r.display())).collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}scrape_configs:\n  - job_name: sonde\n    static_configs:\n      - targets: [{}]\n",
        rules.concat(),
        targets.join(", ")
    );
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, config).expect("write prometheus.yml");
    let log = std::fs::File::create(dir.path().join("log")).expect("prometheus log");
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", path.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        // Exemplars are kept (and scraped as OpenMetrics) only with this feature.
        .arg("--enable-feature=exemplar-storage")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prometheus (apt-get install prometheus, or cargo xtask setup)");
    wait_listening(port);
    // It listens before its storage is open, answering 503 in text until then.
    let ready = crate::wait_for(std::time::Duration::from_secs(30), || {
        let out = Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{port}/-/ready")]).output().ok()?;
        out.status.success().then_some(())
    });
    assert!(ready.is_some(), "Prometheus on port {port} never became ready");
    Server { child, port, dir: Some(dir) }
}
