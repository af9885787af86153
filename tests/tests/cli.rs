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
    let cases: [Case<'_>; 18] = [
        (
            "logs:\n  capture: true\n  files: [\"var/log/*.log\"]\n",
            &["--pid", "1"],
            &[],
            &["logs.files[0]", "absolute"],
        ),
        (
            "logs:\n  redact: [\"(\"]\n",
            &["--pid", "1", "--capture-logs"],
            &[],
            &["logs.redact[0]", "regular expression"],
        ),
        ("logs:\n  capture: true\n  max_bytes: 9\n", &["--pid", "1"], &[], &["logs.max_bytes", "64..="]),
        ("", &["--pid", "1", "--capture-logs"], &[("OTEL_LOGS_EXPORTER", "console")], &["OTEL_LOGS_EXPORTER", "none"]),
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
        (
            "",
            &["--pid", "1"],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://otlp.example"),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem"),
            ],
            &["OTEL_EXPORTER_OTLP_CERTIFICATE", "cannot read /nonexistent/ca.pem"],
        ),
        (
            "",
            &["--pid", "1"],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://otlp.example"),
                ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "/etc/hostname"),
            ],
            &["OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", "needs its certificate"],
        ),
        (
            "export:\n  otlp:\n    endpoint: https://otlp.example\n    client_certificate: /etc/hostname\n    client_key: /etc/hostname\n",
            &["--pid", "1"],
            &[],
            &["export.otlp.client_certificate", "holds no PEM certificate"],
        ),
        (
            "",
            &["--pid", "1"],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), ("OTEL_EXPORTER_OTLP_COMPRESSION", "br")],
            &["OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"],
        ),
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

/// The capability set deploy/ grants (DaemonSet, systemd unit) is enough: `sonde check` loads and
/// attaches every program with only those in the bounding set; without CAP_BPF or CAP_PERFMON,
/// `sonde run` fails and names the missing one.
#[test]
fn privileged_runs_with_the_documented_capabilities_and_names_a_missing_one() {
    let Some(_guard) = privileged_test("least-privilege capability set") else {
        return;
    };
    let caps = ["bpf", "perfmon", "sys_ptrace", "dac_read_search", "sys_resource"];
    let with = |set: &[&str], args: &[&str]| {
        let bounding: Vec<String> = set.iter().map(|c| format!("+{c}")).collect();
        Command::new("setpriv")
            .arg("--bounding-set")
            .arg(format!("-all,{}", bounding.join(",")))
            .arg("--")
            .arg(binary())
            .args(args)
            .output()
            .expect("run setpriv (util-linux)")
    };
    let out = with(&caps, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("programs load and attach"), "{text}");
    for (dropped, name) in [("bpf", "CAP_BPF"), ("perfmon", "CAP_PERFMON")] {
        let set: Vec<&str> = caps.iter().copied().filter(|c| *c != dropped).collect();
        let out = with(&set, &["run", "--pid", "1", "--print", "none"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "without {name}: {stderr}");
        assert!(stderr.contains(&format!("missing capabilities: {name}")), "without {name}: {stderr}");
    }
}

/// tracefs missing: sonde mounts it itself when it may; without CAP_SYS_ADMIN `sonde check` and
/// `sonde run` say what is missing and how to fix it. Runs in a private mount namespace with an
/// empty tmpfs over /sys/kernel/tracing, so the host's tracefs is untouched.
#[test]
fn privileged_missing_tracefs_is_mounted_or_named_with_the_fix() {
    let Some(_guard) = privileged_test("missing tracefs") else {
        return;
    };
    let in_namespace_without_tracefs = |sonde: &str| {
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!("mount -t tmpfs none /sys/kernel/tracing && {sonde}"))
            .output()
            .expect("run unshare (util-linux)")
    };
    let sonde = binary().display().to_string();
    // As root: mounted on demand, everything loads.
    let out = in_namespace_without_tracefs(&format!("{sonde} check"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("mounted at /sys/kernel/tracing") && text.contains("programs load and attach"), "{text}");
    // Without CAP_SYS_ADMIN it cannot be mounted: a clear message from check and from run.
    let setpriv =
        format!("setpriv --bounding-set -all,+bpf,+perfmon,+sys_ptrace,+dac_read_search,+sys_resource -- {sonde}");
    let out = in_namespace_without_tracefs(&format!("{setpriv} check"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("tracefs is not mounted") && text.contains("mount -t tracefs"), "{text}");
    let out = in_namespace_without_tracefs(&format!("{setpriv} run --pid 1 --print none"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tracefs is not mounted") && stderr.contains("CAP_SYS_ADMIN"), "{stderr}");
}

#[test]
fn help_says_what_sonde_does_now() {
    let out = Command::new(binary()).arg("--help").output().expect("run sonde --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["HTTP/1.x", "PostgreSQL", "Redis", "TLS", "OTLP", "RED metrics", "Prometheus"] {
        assert!(text.contains(word), "--help should mention {word}:\n{text}");
    }
}

/// The benchmark's floor arm: the same hook points run programs that only return, and nothing
/// is traced (no events, no spans).
#[test]
fn privileged_floor_mode_attaches_only_empty_programs() {
    let Some(_guard) = privileged_test("sonde --floor") else {
        return;
    };
    let _stats = sonde_e2e::bpf_stats::BpfStats::enable();
    let port = sonde_e2e::free_port();
    let _server = sonde_e2e::servers::python_http(port, None);
    let sonde = sonde_e2e::sonde::Sonde::start(
        &["--open-ports", &port.to_string(), "--floor", "--print", "json"],
        &sonde_e2e::sonde::test_config(""),
        &[],
    );
    let urls: Vec<String> = (0..20).map(|i| format!("http://127.0.0.1:{port}/floor/{i}")).collect();
    sonde_e2e::clients::curl(&["-o", "/dev/null"], &urls);
    let runs = |prefix| sonde_e2e::bpf_stats::runs_of(sonde.pid(), prefix);
    let floor_runs = runs("floor_tracepoi");
    // bpftool shows 15 characters of a program's name.
    let floor_exit_runs = runs("floor_raw_trace");
    let real_runs = runs("sys_") + runs("raw_sys_exit");
    let finished = sonde.stop();
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(finished.stderr.contains("benchmark floor"), "{}", finished.stderr);
    assert!(floor_runs > 0, "the empty program ran at the syscall tracepoints: {floor_runs} runs");
    assert!(
        floor_exit_runs >= 20 * 2,
        "the empty program ran at every syscall exit (the server's recv and send at least): {floor_exit_runs} runs"
    );
    assert_eq!(real_runs, 0, "sonde's own programs are not even loaded");
    assert_eq!(finished.counter("events_read"), Some(0));
    assert!(finished.json_spans().is_empty());
}

/// The enter+exit design the benchmark compares against (`--paired-syscalls`) still traces
/// exactly, and runs its per-syscall hooks instead of the exit hook.
#[test]
fn privileged_paired_syscall_hooks_trace_the_same_requests() {
    let Some(_guard) = privileged_test("sonde --paired-syscalls") else {
        return;
    };
    let _stats = sonde_e2e::bpf_stats::BpfStats::enable();
    let port = sonde_e2e::free_port();
    let _server = sonde_e2e::servers::python_http(port, None);
    let sonde = sonde_e2e::sonde::Sonde::start(
        &["--open-ports", &port.to_string(), "--paired-syscalls", "--print", "json"],
        &sonde_e2e::sonde::test_config(""),
        &[],
    );
    let urls: Vec<String> = (0..10).map(|i| format!("http://127.0.0.1:{port}/paired/{i}")).collect();
    sonde_e2e::clients::curl(&["-o", "/dev/null"], &urls);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let enters = sonde_e2e::bpf_stats::runs_of(sonde.pid(), "sys_enter_recvf");
    let exit_hook = sonde_e2e::bpf_stats::runs_of(sonde.pid(), "raw_sys_exit");
    let finished = sonde.stop();
    assert!(finished.status.success(), "{}", finished.stderr);
    let paths: Vec<String> = finished.json_spans().iter().filter_map(|s| s.s("url.path").map(str::to_owned)).collect();
    assert_eq!(paths, (0..10).map(|i| format!("/paired/{i}")).collect::<Vec<_>>());
    assert!(enters >= 10, "recvfrom's enter hook ran: {enters}");
    assert_eq!(exit_hook, 0, "the exit hook is not attached");
}
