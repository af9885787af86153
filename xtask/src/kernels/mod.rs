//! `cargo xtask kernels`: the kernel matrix. Boots each Debian kernel under QEMU (software
//! emulation: this machine kind has no usable KVM) with the host's root file system, runs
//! `sonde check`, the end-to-end smoke test (`tests/tests/kernel_smoke.rs`) and the injection tests
//! runs the same on this host's kernel. One line per kernel; fails if any kernel fails.

mod fetch;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use fetch::{Kernel, StatusOk};

/// The smoke test every kernel runs.
const SMOKE_TEST: &str = "privileged_kernel_smoke_http_and_https_give_exact_spans";
/// A guest that has not finished by then is a failure (a boot plus the runs take 2-5 minutes
/// under emulation).
const GUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// What one kernel showed.
struct Outcome {
    kernel: String,
    problems: Vec<String>,
    dir: PathBuf,
}

/// Runs the matrix: `only` limits it to kernels whose release contains one of the words
/// (`host` names this machine's kernel).
pub fn run(only: Option<&str>) -> Result<()> {
    let wanted = |release: &str, is_host: bool| {
        only.is_none_or(|o| o.split(',').any(|w| (is_host && w == "host") || series(release) == w))
    };
    let guests: Vec<Kernel> = fetch::prepare()?.into_iter().filter(|k| wanted(&k.release, false)).collect();
    let tests = test_binaries()?;
    let sonde = crate::root().join("target/release/sonde");
    let results = crate::root().join("target/kernels");
    println!(
        "==> kernel matrix: sonde check + {SMOKE_TEST} on each kernel, the injection tests on 6.1, 6.12 and this host (logs in {})",
        results.display()
    );

    let mut outcomes = Vec::new();
    for kernel in &guests {
        let dir = results.join(&kernel.release);
        let config = std::fs::read_to_string(&kernel.config).unwrap_or_default();
        let ran = run_in_guest(kernel, &dir, &sonde, &tests);
        outcomes.push(report(ran, &kernel.release, &dir, &config, kernel.inject_tests)?);
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim().to_owned();
    if wanted(&host, true) {
        let dir = results.join(format!("{host}-host"));
        let config = host_config();
        let ran = run_on_host(&dir, &sonde, &tests);
        outcomes.push(report(ran, &format!("{host} (this host)"), &dir, &config, true)?);
    }

    let failed = outcomes.iter().filter(|o| !o.problems.is_empty()).count();
    println!("kernel matrix: {} of {} kernels passed", outcomes.len() - failed, outcomes.len());
    if failed > 0 {
        for o in outcomes.iter().filter(|o| !o.problems.is_empty()) {
            println!("  {}: {} (logs: {})", o.kernel, o.problems.join("; "), o.dir.display());
        }
        bail!("{failed} kernels failed the matrix");
    }
    Ok(())
}

/// The test binaries every kernel runs.
struct Tests {
    smoke: PathBuf,
    inject: PathBuf,
}

/// Builds the smoke and injection tests (a no-op after `cargo xtask test` built them) and
/// returns their paths.
fn test_binaries() -> Result<Tests> {
    let out = crate::cargo()
        .args(["test", "--release", "-p", "sonde-e2e", "--test", "kernel_smoke", "--test", "inject_e2e"])
        .args(["--no-run", "--message-format=json"])
        .output_text()?;
    let find = |name: &str| {
        out.lines()
            .filter_map(|l| l.split_once("\"executable\":\"").map(|(_, rest)| rest))
            .filter_map(|rest| rest.split_once('"').map(|(path, _)| PathBuf::from(path)))
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(name)))
            .with_context(|| format!("cargo test --no-run named no {name} executable"))
    };
    Ok(Tests { smoke: find("kernel_smoke")?, inject: find("inject_e2e")? })
}

/// The script each kernel runs; it writes its results into `$1` (vng's exit code is always 255).
fn script(sonde: &Path, tests: &Tests, inject_tests: bool) -> String {
    let inject = if inject_tests {
        format!(
            "{} --test-threads=1 --nocapture > \"$out/inject.txt\" 2>&1; echo $? > \"$out/inject.rc\"\n",
            tests.inject.display()
        )
    } else {
        String::new()
    };
    format!(
        "#!/bin/sh\nout=\"$1\"\nexport PATH='{path}' HOME=/root CI=1\ncd /tmp\n\
         {sonde} check > \"$out/check.txt\" 2>&1; echo $? > \"$out/check.rc\"\n\
         bpftool feature probe kernel > \"$out/bpftool.txt\" 2>&1\n\
         {smoke} --exact {SMOKE_TEST} --test-threads=1 > \"$out/e2e.txt\" 2>&1; echo $? > \"$out/e2e.rc\"\n\
         {inject}",
        path = std::env::var("PATH").unwrap_or_default(),
        sonde = sonde.display(),
        smoke = tests.smoke.display(),
    )
}

fn fresh_dir(dir: &Path, sonde: &Path, tests: &Tests, inject_tests: bool) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let script_path = dir.join("run.sh");
    std::fs::write(&script_path, script(sonde, tests, inject_tests))?;
    Ok(script_path)
}

fn run_in_guest(kernel: &Kernel, dir: &Path, sonde: &Path, tests: &Tests) -> Result<Duration> {
    let script = fresh_dir(dir, sonde, tests, kernel.inject_tests)?;
    let console = std::fs::File::create(dir.join("console.log"))?;
    let path = format!("{}:{}", fetch::venv_bin().display(), std::env::var("PATH").unwrap_or_default());
    let started = Instant::now();
    let mut child = Command::new(fetch::venv_bin().join("vng"))
        .arg("--run")
        .arg(&kernel.vmlinuz)
        .args(["--disable-kvm", "--force-9p", "--memory", "2G", "--cpus", "2", "--rwdir"])
        .arg(dir)
        .arg("--exec")
        .arg(format!("sh {} {}", script.display(), dir.display()))
        .env("PATH", path)
        .current_dir("/tmp")
        .stdin(std::process::Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .spawn()
        .context("starting vng")?;
    while child.try_wait()?.is_none() {
        if started.elapsed() > GUEST_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the guest did not finish within {} s", GUEST_TIMEOUT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(started.elapsed())
}

fn run_on_host(dir: &Path, sonde: &Path, tests: &Tests) -> Result<Duration> {
    let script = fresh_dir(dir, sonde, tests, true)?;
    let started = Instant::now();
    Command::new("sh").arg(&script).arg(dir).current_dir("/tmp").status_ok()?;
    Ok(started.elapsed())
}

/// Judges one kernel's results, prints its line and returns them.
fn report(ran: Result<Duration>, kernel: &str, dir: &Path, config: &str, inject_tests: bool) -> Result<Outcome> {
    let mut problems = Vec::new();
    let seconds = match ran {
        Ok(d) => d.as_secs_f64(),
        Err(e) => {
            problems.push(e.to_string());
            0.0
        }
    };
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let check = read("check.txt");
    if read("check.rc").trim() != "0" {
        problems.push(format!("sonde check failed: {}", first_fail(&check)));
    }
    // sonde check must tell this kernel's truth, judged by independent witnesses: the kernel's
    // build configuration and bpftool's own probe.
    let reported = |item: &str, yes: &str| finding(&check, item).is_some_and(|d| d.starts_with(yes));
    let kprobes = reported("kprobes", "available");
    let fentry = reported("fentry", "available");
    let btf = reported("BTF", "present");
    let bpftool = read("bpftool.txt");
    let witnesses = [
        ("kprobes", kprobes, config_set(config, "CONFIG_KPROBES")),
        ("BTF", btf, config_set(config, "CONFIG_DEBUG_INFO_BTF")),
        ("fentry", fentry, Some(bpftool.contains("program_type tracing is available"))),
    ];
    for (item, said, truth) in witnesses {
        match truth {
            Some(truth) if truth != said => {
                problems.push(format!("sonde check says {item} {}, the kernel says {}", yes_no(said), yes_no(truth)))
            }
            Some(_) => {}
            None => problems.push(format!("no witness for {item} (kernel configuration missing)")),
        }
    }
    let e2e = read("e2e.txt");
    let passed = e2e.lines().any(|l| l.starts_with("test result: ok. 1 passed"));
    if read("e2e.rc").trim() != "0" || !passed {
        let why = e2e.lines().find(|l| l.contains("panicked") || l.contains("assertion")).unwrap_or("did not pass");
        problems.push(format!("end-to-end run failed: {why}"));
    }
    // Injection runs in full where the kernel's FIONREAD is sound, and is refused where it is not
    // (sonde's own probe measures it; the tests assert the refusal there).
    let inject = read("inject.txt");
    let inject_passed =
        read("inject.rc").trim() == "0" && inject.lines().any(|l| l.starts_with("test result: ok. 2 passed"));
    let refused = inject.contains("sonde refuses injection");
    // Without the tests, `sonde check` still says whether the programs load and attach here.
    let inject_loads = finding(&check, "traceparent inject").is_some_and(|d| d.starts_with("available"));
    if inject_tests && !inject_passed {
        let why = inject.lines().find(|l| l.contains("panicked") || l.contains("assertion")).unwrap_or("did not pass");
        problems.push(format!("injection run failed: {why}"));
    }
    let verdict = if problems.is_empty() { "ok  " } else { "FAIL" };
    println!(
        "[{verdict}] {kernel:<34} {seconds:>5.1} s  kprobes {}, fentry {}, BTF {}; programs {}; e2e {}; inject {}",
        yes_no(kprobes),
        yes_no(fentry),
        yes_no(btf),
        if finding(&check, "BPF + ring buffer").is_some_and(|d| d.contains("load and attach")) {
            "load"
        } else {
            "REFUSED"
        },
        if passed { "exact spans" } else { "FAILED" },
        match (inject_tests, inject_passed, refused) {
            (false, _, _) if inject_loads => "programs load and attach (tests run on 6.1)",
            (false, _, _) => "unavailable here (tests run on 6.1)",
            (true, false, _) => "FAILED",
            (true, true, false) => "exact",
            (true, true, true) => "refused (FIONREAD hazard)",
        },
    );
    for p in &problems {
        println!("       {p}");
    }
    Ok(Outcome { kernel: kernel.to_owned(), problems, dir: dir.to_owned() })
}

/// The detail of a `sonde check` line, e.g. `kprobes` -> `available (not used: ...)`.
fn finding<'a>(check: &'a str, item: &str) -> Option<&'a str> {
    check.lines().find_map(|l| {
        let rest = l.split_once("] ")?.1;
        let detail = rest.strip_prefix(item)?;
        detail.starts_with(' ').then(|| detail.trim_start())
    })
}

fn first_fail(check: &str) -> &str {
    check.lines().find(|l| l.starts_with("[FAIL]")).unwrap_or("no FAIL line (see check.txt)")
}

/// Whether `CONFIG_X=y` is in a kernel configuration (None when there is no configuration).
fn config_set(config: &str, key: &str) -> Option<bool> {
    (!config.is_empty()).then(|| config.lines().any(|l| l == format!("{key}=y")))
}

fn host_config() -> String {
    Command::new("zcat").arg("/proc/config.gz").output_text().unwrap_or_default()
}

/// `6.12` of `6.12.95+deb12-amd64`.
fn series(release: &str) -> String {
    release
        .split('.')
        .take(2)
        .map(|p| p.split(|c: char| !c.is_ascii_digit()).next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(".")
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}
