//! One line per setup or build step, not the hundreds apt and cargo print: a step says what it
//! does, shows it is alive while it runs, and says how long it took. What its commands print
//! goes to a log file under target/xtask-logs, whose last lines and path are shown if it fails.

use std::{
    fs::File,
    io::{BufRead, BufReader, IsTerminal, Write},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The log of the step running now, if any: commands run inside a step write there.
static CURRENT: Mutex<Option<PathBuf>> = Mutex::new(None);

fn log_dir() -> PathBuf {
    crate::root().join("target/xtask-logs")
}

fn slug(what: &str) -> String {
    let s: String =
        what.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    s.split('-').filter(|p| !p.is_empty()).take(6).collect::<Vec<_>>().join("-")
}

/// Runs `f` as one step: `==> what`, progress while it runs, `done in N s` (or the failure).
pub fn step(what: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    std::fs::create_dir_all(log_dir()).context("creating target/xtask-logs")?;
    let log = log_dir().join(format!("{}.log", slug(what)));
    File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    println!("==> {what}");
    let started = Instant::now();
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(log.clone());
    let result = f();
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = None;
    match result {
        Ok(()) => {
            println!("    done in {:.1} s", started.elapsed().as_secs_f64());
            Ok(())
        }
        Err(e) => {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            println!("    FAILED after {:.1} s; last lines of {}:", started.elapsed().as_secs_f64(), log.display());
            for line in &lines[lines.len().saturating_sub(25)..] {
                println!("    | {line}");
            }
            Err(e.context(format!("{what} failed; full output in {}", log.display())))
        }
    }
}

/// Runs `cmd` to success. Inside a step its output goes to the step's log, with a progress
/// line (elapsed time; crates compiled, for cargo); outside, to the terminal.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let log = CURRENT.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Some(log) = log else {
        let status = cmd.status().with_context(|| format!("starting {shown}"))?;
        if !status.success() {
            bail!("{shown} failed with {status}");
        }
        return Ok(());
    };
    let mut file = std::fs::OpenOptions::new().append(true).open(&log)?;
    writeln!(file, "$ {shown}")?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let file = Arc::new(Mutex::new(file));
    let compiled = Arc::new(AtomicU64::new(0));
    let copy = |stream: Box<dyn std::io::Read + Send>| {
        let (file, compiled) = (file.clone(), compiled.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let t = line.trim_start();
                if t.starts_with("Compiling ") || t.starts_with("Checking ") {
                    compiled.fetch_add(1, Ordering::Relaxed);
                }
                if let Ok(mut f) = file.lock() {
                    let _ = writeln!(f, "{line}");
                }
            }
        })
    };
    let out = copy(Box::new(child.stdout.take().context("stdout")?));
    let err = copy(Box::new(child.stderr.take().context("stderr")?));
    let done = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (done, compiled) = (done.clone(), compiled.clone());
        std::thread::spawn(move || progress(&done, &compiled))
    };
    let status = child.wait();
    let _ = (out.join(), err.join());
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    let status = status.with_context(|| format!("waiting for {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// On a terminal, one line rewritten every second; elsewhere (CI logs), a line every 30 s.
fn progress(done: &AtomicBool, compiled: &AtomicU64) {
    let started = Instant::now();
    let tty = std::io::stdout().is_terminal();
    let every = if tty { Duration::from_secs(1) } else { Duration::from_secs(30) };
    let mut last = Instant::now();
    let mut shown = false;
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        if last.elapsed() < every {
            continue;
        }
        last = Instant::now();
        let n = compiled.load(Ordering::Relaxed);
        let what = if n > 0 { format!(", {n} crates compiled") } else { String::new() };
        let line = format!("    ... {:.0} s{what}", started.elapsed().as_secs_f64());
        if tty {
            print!("\r{line}\x1b[K");
            shown = true;
        } else {
            println!("{line}");
        }
        let _ = std::io::stdout().flush();
    }
    if shown {
        print!("\r\x1b[K");
        let _ = std::io::stdout().flush();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_names_are_short_and_safe() {
        assert_eq!(
            super::slug("installing Debian packages: curl wrk nginx-light"),
            "installing-debian-packages-curl-wrk-nginx"
        );
        assert_eq!(super::slug("building target/release/sonde (eBPF)"), "building-target-release-sonde-ebpf");
    }
}
