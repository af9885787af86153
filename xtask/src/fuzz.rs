//! `cargo xtask fuzz`: every fuzz target in fuzz/ for a fixed time from the committed seed corpus
//! (real traffic), then one line per target with executions run and crashes found.
//!
//! New inputs libFuzzer finds go to fuzz/corpus (not committed); a crash is saved under
//! fuzz/artifacts/<target>/ and belongs in fuzz/regressions/<target>/ once fixed, where the test
//! suite replays it forever.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

pub const TARGETS: &[&str] = &["http", "http2", "postgres", "redis", "pipeline"];

pub struct Outcome {
    pub target: &'static str,
    pub executions: u64,
    pub crashed: bool,
}

pub fn run(seconds: u64, only: Option<&str>) -> Result<()> {
    let root = crate::root();
    let mut outcomes = Vec::new();
    for &target in TARGETS.iter().filter(|t| only.is_none_or(|o| o.split(',').any(|x| x == **t))) {
        println!("==> fuzzing {target} for {seconds} s");
        let corpus = root.join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&root)
            .args(["+nightly", "fuzz", "run", target])
            .arg(&corpus)
            .arg(root.join("fuzz/seeds").join(target))
            .arg("--")
            // Memory is bounded by design: a parser that grows past this is a finding.
            .args([
                &format!("-max_total_time={seconds}"),
                "-rss_limit_mb=1024",
                "-max_len=65536",
                "-timeout=10",
                "-print_final_stats=1",
            ])
            // Only the user-space parsers are fuzzed: no eBPF build.
            .env("AYA_BUILD_SKIP", "1")
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped());
        crate::setup::add_tool_paths(&mut cmd);
        let out = cmd.output().with_context(|| format!("running cargo fuzz for {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
        let executions = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        let crashed = !out.status.success();
        if executions == 0 && !crashed {
            bail!("{target}: libFuzzer reported no executions");
        }
        outcomes.push(Outcome { target, executions, crashed });
    }
    println!("\n{:<10} {:>14} {:>8}", "target", "executions", "crashes");
    for o in &outcomes {
        println!("{:<10} {:>14} {:>8}", o.target, o.executions, u8::from(o.crashed));
    }
    let crashed: Vec<&str> = outcomes.iter().filter(|o| o.crashed).map(|o| o.target).collect();
    if !crashed.is_empty() {
        bail!(
            "crash in {}: the input is under fuzz/artifacts/<target>/; fix it and copy the input to fuzz/regressions/<target>/",
            crashed.join(", ")
        );
    }
    Ok(())
}
