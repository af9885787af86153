//! The `sonde` command line: configuration errors and `sonde check`.

use std::process::Command;

use sonde_e2e::{TempDir, privileged_test, sonde::binary};

fn run_with_config(subcommand: &str, config: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let dir = TempDir::new("cli");
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, config).expect("write config");
    let mut cmd = Command::new(binary());
    cmd.arg(subcommand).arg("--config").arg(&path).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run sonde");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_configuration_exits_2_and_names_the_key_and_the_fix() {
    // (config file, arguments, environment, words the error must contain)
    type Case<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case<'_>; 10] = [
        ("capture:\n  max_byte: 10\n", &["--pid", "1"], &[], &["max_byte", "max_bytes"]),
        ("", &["--open-ports", "9100-9000"], &[], &["--open-ports", "backwards"]),
        ("", &["--exe-path", "[bad"], &[], &["--exe-path", "glob"]),
        ("", &[], &[], &["discovery", "--open-ports"]),
        (
            "",
            &["--pid", "1"],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")],
            &["OTEL_EXPORTER_OTLP_ENDPOINT", "http://"],
        ),
        ("", &["--pid", "1"], &[("OTEL_TRACES_SAMPLER", "sometimes")], &["OTEL_TRACES_SAMPLER", "traceidratio"]),
        ("discovery:\n  - open_ports: http\n", &[], &[], &["discovery[0].open_ports", "8080"]),
        ("metrics:\n  max_series: 0\n", &["--pid", "1"], &[], &["metrics.max_series", "2000"]),
        ("", &["--pid", "1"], &[("OTEL_METRIC_EXPORT_INTERVAL", "soon")], &["OTEL_METRIC_EXPORT_INTERVAL", "60000"]),
        ("", &["--pid", "1"], &[("OTEL_METRICS_EXPORTER", "console")], &["OTEL_METRICS_EXPORTER", "none"]),
    ];
    // `sonde config` reports exactly what `sonde run` would refuse.
    for subcommand in ["run", "config"] {
        for (config, args, env, needles) in cases {
            let (code, stderr) = run_with_config(subcommand, config, args, env);
            assert_eq!(code, 2, "{subcommand}: config {config:?} args {args:?}: {stderr}");
            for n in needles {
                assert!(stderr.contains(n), "{subcommand}: expected {n:?} in: {stderr}");
            }
        }
    }
}

#[test]
fn privileged_check_reports_this_kernel() {
    let Some(_guard) = privileged_test("sonde check") else {
        return;
    };
    let out = Command::new(binary()).arg("check").output().expect("run sonde check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    for item in ["CAP_BPF", "tracefs", "tracepoints", "uprobes", "kprobes", "BTF", "BPF + ring buffer"] {
        assert!(text.contains(item), "{item} missing from:\n{text}");
    }
    assert!(text.contains("programs load and attach"), "{text}");
}
