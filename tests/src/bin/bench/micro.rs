//! The user-space micro-benchmarks (agent/benches/pipeline.rs, criterion): events/s through
//! reassembly, parsing, pairing and span assembly per protocol, spans/s through OTLP encoding.

use std::process::Command;

/// The cargo command that runs them (recorded in BENCHMARKS.md).
pub const COMMAND: &str = "cargo bench -p sonde --bench pipeline -- --warm-up-time 1 --measurement-time 3 --noplot";

/// (benchmark, elements per second) from criterion's output.
pub fn run() -> Vec<(String, f64)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let args: Vec<&str> = COMMAND.split_whitespace().skip(1).collect();
    let out = Command::new(cargo).args(&args).current_dir(root).output().expect("run cargo bench");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "cargo bench failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    parse(&text)
}

fn parse(text: &str) -> Vec<(String, f64)> {
    let mut results = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.is_empty() && !line.starts_with("Benchmarking") {
            let name = line.split("  ").next().unwrap_or(line).split(" time:").next().unwrap_or(line).trim();
            if name.contains('/') {
                current = Some(name.to_owned());
            }
        }
        let Some(rest) = line.trim().strip_prefix("thrpt:") else { continue };
        if rest.contains('%') {
            continue;
        }
        let parts: Vec<&str> = rest.trim().trim_matches(['[', ']']).split_whitespace().collect();
        // [low unit mid unit high unit]
        if let (Some(name), Some(value), Some(unit)) = (current.take(), parts.get(2), parts.get(3)) {
            let scale = match unit.chars().next() {
                Some('K') => 1e3,
                Some('M') => 1e6,
                Some('G') => 1e9,
                _ => 1.0,
            };
            results.push((name, value.parse::<f64>().unwrap_or(f64::NAN) * scale));
        }
    }
    results
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_criterion_output() {
        let text = "pipeline/http events    time:   [3.0844 ms 3.0953 ms 3.1072 ms]\n                        thrpt:  [643.66 Kelem/s 646.13 Kelem/s 648.43 Kelem/s]\n                        thrpt:  [+34.847% +39.204% +43.381%]\npipeline/postgresql events\n                        time:   [1 ms 1 ms 1 ms]\n                        thrpt:  [1.0754 Melem/s 1.0773 Melem/s 1.0793 Melem/s]\n";
        let r = super::parse(text);
        assert_eq!(
            r,
            vec![
                ("pipeline/http events".to_owned(), 646_130.0),
                ("pipeline/postgresql events".to_owned(), 1_077_300.0)
            ]
        );
    }
}
