//! Runs the real `sonde` binary as a child process and collects what it prints and logs.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{
    TempDir,
    span::{TestSpan, from_json_line},
};

/// The release binary the tests exercise (`cargo xtask test` builds it first).
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SONDE_BIN") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/sonde");
    assert!(p.exists(), "{} is missing: build it with `cargo build --release -p sonde`", p.display());
    p
}

pub struct Sonde {
    child: Option<Child>,
    dir: TempDir,
}

pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Spans printed with `--print json`.
    pub fn json_spans(&self) -> Vec<TestSpan> {
        self.stdout.lines().filter_map(from_json_line).collect()
    }

    /// A counter from the final summary line, e.g. `events_lost`.
    pub fn counter(&self, name: &str) -> Option<u64> {
        let line = self.stderr.lines().rev().find(|l| l.contains("final counters:"))?;
        line.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{name}="))?.parse().ok())
    }
}

impl Sonde {
    /// Starts `sonde run ARGS` with `config` (YAML) and env; returns once discovery has run.
    pub fn start(args: &[&str], config: &str, env: &[(&str, String)]) -> Self {
        let dir = TempDir::new("sonde");
        let cfg = dir.path().join("sonde.yaml");
        std::fs::write(&cfg, config).expect("write config");
        let stdout = std::fs::File::create(dir.path().join("stdout")).expect("stdout file");
        let stderr = std::fs::File::create(dir.path().join("stderr")).expect("stderr file");
        let mut cmd = Command::new(binary());
        cmd.arg("run").arg("--config").arg(&cfg).args(args);
        for k in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_SERVICE_NAME",
            "OTEL_TRACES_SAMPLER",
            "OTEL_METRIC_EXPORT_INTERVAL",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            // No Kubernetes API unless a test gives one.
            "KUBECONFIG",
            "KUBERNETES_SERVICE_HOST",
            "NODE_NAME",
        ] {
            cmd.env_remove(k);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr).spawn().expect("spawn sonde");
        let mut s = Self { child: Some(child), dir };
        let ready = crate::wait_for(Duration::from_secs(60), || {
            // An exit (e.g. a configuration error) fails at once rather than after the timeout.
            let exited = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            assert!(exited.is_none(), "sonde exited with {exited:?}:\n{}", s.stderr());
            s.stderr().contains("waiting for more").then_some(())
        });
        assert!(ready.is_some(), "sonde did not become ready:\n{}", s.stderr());
        s
    }

    /// The configuration file this sonde runs with (for `sonde check --config` on the same).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("sonde.yaml")
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Resident memory now, in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    /// CPU time sonde used so far (user + system), in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
        // utime and stime are fields 14 and 15; after the command they are the 12th and 13th.
        let ticks: u64 = fields.iter().skip(11).take(2).filter_map(|f| f.parse::<u64>().ok()).sum();
        ticks as f64 / 100.0
    }

    /// SIGKILL: no shutdown path runs at all.
    pub fn kill(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), 9);
        child.wait().expect("wait for killed sonde")
    }

    /// SIGINT, then wait for a clean exit.
    pub fn stop(mut self) -> Finished {
        let mut child = self.child.take().expect("running");
        signal(child.id(), 2);
        let status =
            crate::wait_for(Duration::from_secs(30), || child.try_wait().ok().flatten()).unwrap_or_else(|| {
                let _ = child.kill();
                panic!("sonde did not exit within 30s of SIGINT:\n{}", self.stderr())
            });
        Finished { status, stdout: self.stdout(), stderr: self.stderr() }
    }
}

impl Drop for Sonde {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `/proc/PID/status` field in KiB (e.g. `VmRSS:`), 0 when unreadable.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub fn signal(pid: u32, sig: i32) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// A config with fast export batching, for tests.
pub fn test_config(extra: &str) -> String {
    format!("export:\n  otlp:\n    batch_timeout_ms: 100\n{extra}")
}
