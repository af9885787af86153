//! Project tasks: `cargo xtask setup | build | test | demo | bench | fuzz`.
//!
//! Every task runs `setup` first; setup installs only what is missing, so it is quick when
//! everything is there.

mod demo;
mod fuzz;
mod kernels;
mod setup;
mod steps;

use std::process::Command;

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask <setup|build|test|demo [--seconds N]|bench [--pairs N] [--seconds S]|fuzz [--seconds S] [--only T,..]|kernels [--only 5.10,6.1,6.12,host]>

  setup   install what is missing: Debian packages, the nightly's rust-src, bpf-linker (LLVM 22)
  build   setup, then build the release binary target/release/sonde
  test    setup, build, then run every test (unit, parser sweeps, end-to-end as root), then the kernel matrix
  kernels setup, build, boot each kernel of the matrix under QEMU: sonde check + the smoke test in each
  demo    setup, build, start two HTTP services on loopback, trace them and print spans live
  bench   setup, build, measure sonde against no agent (nginx, redis, pgbench, HTTPS); writes BENCHMARKS.md
  fuzz    setup, install cargo-fuzz, run each parser's fuzz target from the seed corpus (default 60 s each)";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("setup") => setup::run(),
        Some("build") => {
            setup::run()?;
            build()
        }
        Some("test") => {
            setup::run()?;
            build()?;
            let suite = test();
            // The kernel matrix runs even after a failure, so one run reports both.
            let matrix = kernels::run(None);
            suite.and(matrix)
        }
        Some("kernels") => {
            setup::run()?;
            build()?;
            let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).map(String::as_str);
            kernels::run(only)
        }
        Some("demo") => {
            setup::run()?;
            build()?;
            let seconds = match args.iter().position(|a| a == "--seconds") {
                Some(i) => args.get(i + 1).and_then(|s| s.parse().ok()).context("--seconds needs a number")?,
                None => 30,
            };
            demo::run(seconds)
        }
        Some("bench") => {
            setup::run()?;
            build()?;
            println!(
                "==> benchmarks: rounds of no agent / floor / sonde per scenario (about 15 minutes with the defaults)"
            );
            run(cargo().args(["run", "--release", "-p", "sonde-e2e", "--bin", "bench", "--"]).args(&args[1..]))
        }
        Some("fuzz") => {
            setup::run()?;
            setup::cargo_fuzz()?;
            let seconds = match args.iter().position(|a| a == "--seconds") {
                Some(i) => args.get(i + 1).and_then(|s| s.parse().ok()).context("--seconds needs a number")?,
                None => 60,
            };
            let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).map(String::as_str);
            fuzz::run(seconds, only)
        }
        _ => {
            eprintln!("{USAGE}");
            bail!("unknown or missing task")
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(|p| p.to_path_buf()).unwrap_or_default()
}

/// Runs a command to success (quietly, into the step's log, inside a [`steps::step`]).
pub fn run(cmd: &mut Command) -> Result<()> {
    steps::run(cmd)
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    setup::add_tool_paths(&mut c);
    c
}

fn build() -> Result<()> {
    steps::step("building target/release/sonde (eBPF programs included)", || {
        run(cargo().args(["build", "--release", "-p", "sonde"]))
    })
}

fn test() -> Result<()> {
    const SELECTION: [&str; 12] = [
        "--release",
        "--lib",
        "--bins",
        "--tests",
        "-p",
        "sonde",
        "-p",
        "sonde-common",
        "-p",
        "sonde-e2e",
        "-p",
        "xtask",
    ];
    steps::step("building the tests (release profile, shared with the build)", || {
        run(cargo().arg("test").args(SELECTION).arg("--no-run"))
    })?;
    println!("==> running all tests");
    // End-to-end tests share the machine's ports and kernel: one test thread.
    let mut cmd = cargo();
    cmd.arg("test").args(SELECTION).args([
        // Every test binary runs even after one fails: the summary names all failures.
        "--no-fail-fast",
        "--",
        "--test-threads=1",
    ]);
    let (passed, failed) = run_counting(&mut cmd)?;
    // One closing line for the whole suite.
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} tests failed");
    }
    Ok(())
}

/// Runs cargo test, echoing its output, and sums its `test result:` lines.
fn run_counting(cmd: &mut Command) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().context("starting cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(word)?.trim().rsplit(' ').next()?.parse().ok())
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("cargo test failed with {status}");
    }
    Ok((passed, failed))
}
