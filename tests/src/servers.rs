//! Real servers for the tests, each on a loopback port in a temp directory, stopped on drop.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use crate::{TempDir, wait_listening};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// A child process killed (with its process group) on drop.
pub struct Server {
    pub child: Child,
    pub port: u16,
    _dir: Option<TempDir>,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// tests/fixtures/http_server.py on `port`, optionally calling a backend.
pub fn python_http(port: u16, backend: Option<u16>) -> Server {
    let mut cmd = Command::new("python3");
    cmd.arg(fixture("http_server.py")).arg(port.to_string());
    if let Some(b) = backend {
        cmd.arg("--backend").arg(b.to_string());
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start python3 http server");
    wait_listening(port);
    Server {
        child,
        port,
        _dir: None,
    }
}

/// nginx (master + 2 workers) serving a temp docroot on `port`: `/index.html` (a small file),
/// `/big.bin` (1 MiB, sent with sendfile), `/missing` (404), `/teapot` (418 from `return`).
pub fn nginx(port: u16) -> Server {
    let dir = TempDir::new("nginx");
    let root = dir.path().join("www");
    std::fs::create_dir_all(&root).expect("docroot");
    std::fs::write(root.join("index.html"), b"<html>hello from nginx</html>\n").expect("index");
    std::fs::write(root.join("big.bin"), vec![b'x'; 1 << 20]).expect("big file");
    let d = dir.path().display();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  sendfile on;\n  keepalive_requests 100000;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  server {{\n    listen 127.0.0.1:{port};\n    root {root};\n    location /teapot {{ return 418 \"short and stout\"; }}\n  }}\n}}\n",
        root = root.display()
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("nginx.conf");
    let child = Command::new("/usr/sbin/nginx")
        .arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx (apt-get install nginx-light, or run cargo xtask setup)");
    wait_listening(port);
    Server {
        child,
        port,
        _dir: Some(dir),
    }
}
