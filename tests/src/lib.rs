//! Helpers for sonde's end-to-end tests: they load sonde for real (root, eBPF) against real
//! servers and clients on loopback, and read what it exports through an OTLP receiver.

pub mod bpf_stats;
pub mod clients;
pub mod kube;
pub mod log_record;
pub mod otlp;
pub mod pki;
pub mod promql;
pub mod servers;
pub mod sonde;
pub mod span;

use std::{
    net::TcpListener,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

/// End-to-end tests load eBPF programs and drive servers: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the global test lock, or returns None (after saying why) when the test cannot run.
///
/// These tests need root to load eBPF. Outside CI a non-root run prints that the test was not
/// run; in CI (`CI` set) that is a failure, never a silent skip.
pub fn privileged_test(name: &str) -> Option<MutexGuard<'static, ()>> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc_geteuid() } == 0;
    if !root {
        if std::env::var_os("CI").is_some() {
            panic!("{name} needs root to load eBPF programs, and CI must run it as root");
        }
        eprintln!("NOT RUN: {name} needs root to load eBPF programs (run the tests as root: cargo xtask test)");
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(|p| p.into_inner()))
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind an ephemeral port")
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long a server may take to listen: generous, since the kernel matrix runs the servers
/// under software emulation (a Python server takes seconds to start there).
const LISTEN_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until something accepts TCP connections on the port.
pub fn wait_listening(port: u16) {
    wait_for(LISTEN_TIMEOUT, || std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .unwrap_or_else(|| panic!("nothing listens on 127.0.0.1:{port} after {} s", LISTEN_TIMEOUT.as_secs()));
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n: u64 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("sonde-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
