//! Configuration: the YAML file, command-line additions and OpenTelemetry environment variables,
//! validated into one [`AgentConfig`]. Every error names the key and how to fix it.

use std::path::Path;

use serde::Deserialize;
use sonde_common::{DEFAULT_CAPTURE, MAX_CAPTURE};

use crate::{
    discovery::selector::{PodCriteria, PortSet, Selector, compile_glob},
    export::otlp::{OtlpSettings, OtlpSettingsError},
    k8s::{KubernetesSettings, pod::OwnerKind},
    trace::{resource::parse_resource_attributes, sampler::Sampler},
};

#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// The config key or environment variable at fault.
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: key.into(), message: message.into() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PrintMode {
    Text,
    Json,
    None,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub discovery: Vec<SelectorConfig>,
    /// Processes never traced, whatever the selectors say.
    #[serde(default)]
    pub exclude: Vec<SelectorConfig>,
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    #[serde(default)]
    pub capture: CaptureConfig,
    #[serde(default)]
    pub export: ExportConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub propagation: PropagationConfig,
    #[serde(default)]
    pub logs: LogsConfig,
}

/// What traced processes write, exported as OTLP log records (opt-in: it ships application
/// output).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogsConfig {
    /// Capture writes to stdout and stderr (fds 1 and 2) and to `files`.
    pub capture: bool,
    /// Globs of log file paths (e.g. `/var/log/nginx/*.log`), opened before or after sonde started.
    pub files: Vec<String>,
    /// Bytes copied per write; the rest of a longer write is counted, not captured.
    pub max_bytes: u32,
    /// How long a record waits for its continuation lines, and a partial line for its end.
    pub flush_ms: u64,
    /// Extra redaction rules: regular expressions whose matches (or first capture group) are
    /// replaced by `[REDACTED]`.
    pub redact: Vec<String>,
    /// Keep the built-in rules (credentials in headers, key=value pairs, URLs).
    pub redact_defaults: bool,
    pub queue_records: usize,
    pub batch_records: usize,
}

impl Default for LogsConfig {
    fn default() -> Self {
        Self {
            capture: false,
            files: Vec::new(),
            max_bytes: 2048,
            flush_ms: 100,
            redact: Vec::new(),
            redact_defaults: true,
            queue_records: 16384,
            batch_records: 512,
        }
    }
}

/// Trace context propagation that changes traffic (opt-in).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PropagationConfig {
    /// Write a W3C traceparent into outgoing plaintext HTTP/1.x requests of traced processes.
    pub inject_http: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Distinct attribute sets per metric; beyond, measurements go to one overflow series.
    pub max_series: usize,
    pub prometheus: PrometheusConfig,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { max_series: 2000, prometheus: PrometheusConfig::default() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusConfig {
    /// Serve GET /metrics on this port; none: no endpoint.
    pub port: Option<u16>,
    /// Address to bind; loopback unless configured otherwise.
    pub address: std::net::IpAddr,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        Self { port: None, address: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST) }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectorConfig {
    #[serde(rename = "service.name")]
    pub service_name: Option<String>,
    /// `8080` or `"8080,9000-9100"`.
    pub open_ports: Option<serde_yaml::Value>,
    pub exe_path: Option<String>,
    #[serde(default)]
    pub pid: Vec<u32>,
    /// Pod and container criteria (globs), matched against the Kubernetes API's pods.
    pub k8s_namespace: Option<String>,
    pub k8s_pod_name: Option<String>,
    pub k8s_deployment_name: Option<String>,
    pub k8s_replicaset_name: Option<String>,
    pub k8s_statefulset_name: Option<String>,
    pub k8s_daemonset_name: Option<String>,
    pub k8s_job_name: Option<String>,
    pub k8s_cronjob_name: Option<String>,
    pub k8s_owner_name: Option<String>,
    pub container_name: Option<String>,
    pub k8s_pod_labels: Option<std::collections::BTreeMap<String, String>>,
    pub k8s_pod_annotations: Option<std::collections::BTreeMap<String, String>>,
}

/// The Kubernetes API side (`kubernetes:`): used when the host has an API configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// `k8s.cluster.name` on every resource (the API does not know it).
    pub cluster_name: Option<String>,
    /// This node's name; default `NODE_NAME`, else the host name.
    pub node_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    pub max_bytes: u32,
    pub ring_buffer_bytes: u32,
    pub wakeup_bytes: u32,
    pub poll_interval_ms: u64,
    /// Attach the OpenSSL uprobes. They fire in every process that maps the same library file,
    /// traced or not (the eBPF PID filter then drops them), which costs TLS-heavy untraced
    /// processes throughput: `false` turns TLS capture off.
    pub tls: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_CAPTURE,
            ring_buffer_bytes: 8 << 20,
            wakeup_bytes: 256 << 10,
            poll_interval_ms: 20,
            tls: true,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    pub print: Option<PrintMode>,
    pub otlp: OtlpFileConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpFileConfig {
    pub endpoint: Option<String>,
    pub protocol: Option<String>,
    /// Request headers (e.g. an API key). `OTEL_EXPORTER_OTLP_HEADERS` replaces them.
    pub headers: std::collections::BTreeMap<String, String>,
    /// `gzip` or `none`.
    pub compression: Option<String>,
    /// PEM file of the CA the collector's certificate must chain to (only it is trusted then).
    pub certificate: Option<String>,
    /// PEM files of sonde's client certificate and key, for collectors that require mTLS.
    pub client_certificate: Option<String>,
    pub client_key: Option<String>,
    /// gRPC only, for an endpoint written without a scheme: plain text instead of TLS.
    pub insecure: Option<bool>,
    pub queue_spans: usize,
    pub batch_spans: usize,
    pub batch_timeout_ms: u64,
    pub timeout_ms: u64,
}

impl Default for OtlpFileConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            protocol: None,
            headers: Default::default(),
            compression: None,
            certificate: None,
            client_certificate: None,
            client_key: None,
            insecure: None,
            queue_spans: 16384,
            batch_spans: 512,
            batch_timeout_ms: 1000,
            timeout_ms: 5000,
        }
    }
}

/// What the command line adds on top of the file.
#[derive(Debug, Default)]
pub struct CliSelection {
    pub open_ports: Option<String>,
    pub exe_path: Option<String>,
    pub pids: Vec<u32>,
    pub print: Option<PrintMode>,
    pub prometheus_port: Option<u16>,
    /// `--inject-traceparent`.
    pub inject_traceparent: bool,
    /// `--floor` (benchmarks only).
    pub floor: bool,
    /// `--paired-syscalls` (benchmarks only).
    pub paired_syscalls: bool,
    /// `--capture-logs`.
    pub capture_logs: bool,
}

/// Everything the agent needs, validated.
#[derive(Debug)]
pub struct AgentConfig {
    pub selectors: Vec<Selector>,
    /// Never traced: `exclude[]`, and the kube-system namespace unless a selector names it.
    pub excludes: Vec<Selector>,
    pub kubernetes: KubernetesSettings,
    pub capture: CaptureConfig,
    pub print: PrintMode,
    pub otlp: Option<OtlpSettings>,
    pub sampler: Sampler,
    pub resource_attributes: Vec<(String, String)>,
    pub service_name: Option<String>,
    pub max_series: usize,
    /// Where to serve Prometheus metrics, if anywhere.
    pub prometheus: Option<std::net::SocketAddr>,
    /// OTLP metrics export and its interval, if an endpoint is configured.
    pub otlp_metrics: Option<(OtlpSettings, std::time::Duration)>,
    /// Traceparent injection into outgoing HTTP/1.x requests (`propagation.inject_http`).
    pub inject_http: bool,
    /// Benchmark floor: empty programs at the hook points, nothing else (`--floor`).
    pub floor: bool,
    /// The data syscalls hooked at enter and exit, not by the exit hook (`--paired-syscalls`).
    pub paired_syscalls: bool,
    /// Present when log capture is on.
    pub logs: Option<LogSettings>,
}

/// Log capture, validated.
#[derive(Debug)]
pub struct LogSettings {
    pub files: Vec<globset::GlobMatcher>,
    pub max_bytes: u32,
    pub flush: std::time::Duration,
    pub redaction: crate::logs::redact::Redactor,
    /// Where records go over OTLP (`OTEL_EXPORTER_OTLP_LOGS_*`), unless `OTEL_LOGS_EXPORTER=none`.
    pub otlp: Option<OtlpSettings>,
}

pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new("--config", format!("cannot read {}: {e}; pass a readable YAML file", path.display()))
    })?;
    parse_file(&text).map_err(|e| ConfigError { key: format!("{} {}", path.display(), e.key), message: e.message })
}

pub fn parse_file(text: &str) -> Result<FileConfig, ConfigError> {
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_yaml::from_str(text).map_err(|e| {
        let msg = e.to_string();
        // serde names unknown keys as "unknown field `x`, expected one of ..."; lead with the key.
        let key = msg.split('`').nth(1).map(str::to_owned).unwrap_or_else(|| "config".into());
        let hint = if msg.contains("unknown field") {
            "remove it or fix its spelling (see the config reference in README.md)"
        } else {
            "fix the value's type or YAML syntax (see the config reference in README.md)"
        };
        ConfigError::new(key, format!("{msg}; {hint}"))
    })
}

/// Env lookup, injectable for tests.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn build(file: FileConfig, cli: CliSelection, env: Env<'_>) -> Result<AgentConfig, ConfigError> {
    let mut selectors = Vec::new();
    for (i, s) in file.discovery.iter().enumerate() {
        selectors.push(selector_from(s, &format!("discovery[{i}]"))?);
    }
    let mut excludes = Vec::new();
    for (i, s) in file.exclude.iter().enumerate() {
        if s.service_name.is_some() {
            return Err(ConfigError::new(
                format!("exclude[{i}].service.name"),
                "an exclude names no service; remove it",
            ));
        }
        excludes.push(selector_from(s, &format!("exclude[{i}]"))?);
    }
    // kube-system is excluded unless a selector names it.
    if !selectors.iter().any(|s| s.names_namespace("kube-system")) {
        excludes.push(Selector::namespace("kube-system"));
    }
    if let Some(p) = &cli.open_ports {
        let ports = PortSet::parse(p).map_err(|m| ConfigError::new("--open-ports", m))?;
        selectors.push(Selector { open_ports: Some(ports), ..Selector::default() });
    }
    if let Some(g) = &cli.exe_path {
        let glob = compile_glob(g).map_err(|m| ConfigError::new("--exe-path", m))?;
        selectors.push(Selector { exe_path: Some(glob), ..Selector::default() });
    }
    if !cli.pids.is_empty() {
        selectors.push(Selector { pids: cli.pids.clone(), ..Selector::default() });
    }
    if selectors.is_empty() {
        return Err(ConfigError::new(
            "discovery",
            "no process selected; pass --open-ports, --exe-path or --pid, or list selectors under `discovery:` in the config",
        ));
    }

    let c = &file.capture;
    if !(64..=MAX_CAPTURE as u32).contains(&c.max_bytes) {
        return Err(ConfigError::new(
            "capture.max_bytes",
            format!("{} is out of range; use 64..={MAX_CAPTURE}", c.max_bytes),
        ));
    }
    if !c.ring_buffer_bytes.is_power_of_two() || c.ring_buffer_bytes < 1 << 16 {
        return Err(ConfigError::new(
            "capture.ring_buffer_bytes",
            format!("{} must be a power of two of at least 65536, e.g. 8388608", c.ring_buffer_bytes),
        ));
    }
    if c.wakeup_bytes >= c.ring_buffer_bytes {
        return Err(ConfigError::new("capture.wakeup_bytes", "must be smaller than capture.ring_buffer_bytes"));
    }
    if c.poll_interval_ms == 0 || c.poll_interval_ms > 1000 {
        return Err(ConfigError::new("capture.poll_interval_ms", "use 1..=1000"));
    }

    let otlp = OtlpSettings::from_env(&file.export.otlp, env)
        .map_err(|e: OtlpSettingsError| ConfigError::new(e.key, e.message))?;
    let print =
        cli.print.or(file.export.print).unwrap_or(if otlp.is_some() { PrintMode::None } else { PrintMode::Text });
    let sampler = Sampler::from_env(env("OTEL_TRACES_SAMPLER").as_deref(), env("OTEL_TRACES_SAMPLER_ARG").as_deref())
        .map_err(|e| ConfigError::new("OTEL_TRACES_SAMPLER", e.to_string()))?;
    let resource_attributes = match env("OTEL_RESOURCE_ATTRIBUTES") {
        Some(raw) => parse_resource_attributes(&raw).map_err(|m| ConfigError::new("OTEL_RESOURCE_ATTRIBUTES", m))?,
        None => Vec::new(),
    };
    let service_name = env("OTEL_SERVICE_NAME").filter(|s| !s.is_empty());
    if file.metrics.max_series == 0 {
        return Err(ConfigError::new("metrics.max_series", "must be at least 1, e.g. 2000"));
    }
    let prometheus = cli
        .prometheus_port
        .or(file.metrics.prometheus.port)
        .map(|port| std::net::SocketAddr::new(file.metrics.prometheus.address, port));
    let otlp_metrics = OtlpSettings::for_signal(crate::export::otlp::Signal::Metrics, &file.export.otlp, env)
        .map_err(|e: OtlpSettingsError| ConfigError::new(e.key, e.message))?;
    let interval_ms = match env("OTEL_METRIC_EXPORT_INTERVAL") {
        Some(v) => v.trim().parse::<u64>().ok().filter(|ms| *ms > 0).ok_or_else(|| {
            ConfigError::new("OTEL_METRIC_EXPORT_INTERVAL", format!("{v:?} must be milliseconds above 0, e.g. 60000"))
        })?,
        None => 60_000,
    };
    // OTEL_METRICS_EXPORTER=none keeps metrics on the Prometheus endpoint only.
    let otlp_metrics = match env("OTEL_METRICS_EXPORTER").as_deref().map(str::trim) {
        None | Some("otlp") => otlp_metrics,
        Some("none") => None,
        Some(other) => {
            return Err(ConfigError::new(
                "OTEL_METRICS_EXPORTER",
                format!(
                    "{other:?} is not supported; use otlp (default) or none (use --prometheus-port for Prometheus)"
                ),
            ));
        }
    };
    let otlp_metrics = otlp_metrics.map(|s| (s, std::time::Duration::from_millis(interval_ms)));
    let logs = if file.logs.capture || cli.capture_logs { Some(log_settings(&file, env)?) } else { None };
    let kubernetes = KubernetesSettings {
        cluster_name: file.kubernetes.cluster_name.clone().filter(|c| !c.is_empty()),
        node_name: file
            .kubernetes
            .node_name
            .clone()
            .or_else(|| env("NODE_NAME"))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(crate::discovery::procfs::host_name),
    };
    Ok(AgentConfig {
        selectors,
        excludes,
        kubernetes,
        capture: file.capture,
        print,
        otlp,
        sampler,
        resource_attributes,
        service_name,
        max_series: file.metrics.max_series,
        prometheus,
        otlp_metrics,
        inject_http: file.propagation.inject_http || cli.inject_traceparent,
        floor: cli.floor,
        paired_syscalls: cli.paired_syscalls,
        logs,
    })
}

/// One `discovery[]` or `exclude[]` entry; `at` names it in errors.
fn selector_from(s: &SelectorConfig, at: &str) -> Result<Selector, ConfigError> {
    let key = |k: &str| format!("{at}.{k}");
    let open_ports = match &s.open_ports {
        None => None,
        Some(v) => {
            let text = match v {
                serde_yaml::Value::Number(n) => n.to_string(),
                serde_yaml::Value::String(s) => s.clone(),
                _ => {
                    return Err(ConfigError::new(
                        key("open_ports"),
                        "must be a port or a string like \"8080,9000-9100\"",
                    ));
                }
            };
            Some(PortSet::parse(&text).map_err(|m| ConfigError::new(key("open_ports"), m))?)
        }
    };
    let glob = |name: &str, value: &Option<String>| {
        value.as_deref().map(compile_glob).transpose().map_err(|m| ConfigError::new(key(name), m))
    };
    let globs = |name: &str, value: &Option<std::collections::BTreeMap<String, String>>| {
        value
            .iter()
            .flatten()
            .map(|(k, v)| {
                compile_glob(v).map(|g| (k.clone(), g)).map_err(|m| ConfigError::new(format!("{}.{k}", key(name)), m))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let mut owners = Vec::new();
    for (name, kind, value) in [
        ("k8s_deployment_name", OwnerKind::Deployment, &s.k8s_deployment_name),
        ("k8s_replicaset_name", OwnerKind::ReplicaSet, &s.k8s_replicaset_name),
        ("k8s_statefulset_name", OwnerKind::StatefulSet, &s.k8s_statefulset_name),
        ("k8s_daemonset_name", OwnerKind::DaemonSet, &s.k8s_daemonset_name),
        ("k8s_job_name", OwnerKind::Job, &s.k8s_job_name),
        ("k8s_cronjob_name", OwnerKind::CronJob, &s.k8s_cronjob_name),
    ] {
        if let Some(g) = glob(name, value)? {
            owners.push((kind, g));
        }
    }
    let sel = Selector {
        service_name: s.service_name.clone(),
        open_ports,
        exe_path: glob("exe_path", &s.exe_path)?,
        pids: s.pid.clone(),
        k8s: PodCriteria {
            namespace: glob("k8s_namespace", &s.k8s_namespace)?,
            pod_name: glob("k8s_pod_name", &s.k8s_pod_name)?,
            owners,
            owner_name: glob("k8s_owner_name", &s.k8s_owner_name)?,
            container_name: glob("container_name", &s.container_name)?,
            pod_labels: globs("k8s_pod_labels", &s.k8s_pod_labels)?,
            pod_annotations: globs("k8s_pod_annotations", &s.k8s_pod_annotations)?,
        },
    };
    if sel.is_empty() {
        return Err(ConfigError::new(
            at,
            "selects nothing; set open_ports, exe_path, pid or a k8s_*/container_name criterion",
        ));
    }
    Ok(sel)
}

fn log_settings(file: &FileConfig, env: Env<'_>) -> Result<LogSettings, ConfigError> {
    let l = &file.logs;
    if !(64..=MAX_CAPTURE as u32).contains(&l.max_bytes) {
        return Err(ConfigError::new(
            "logs.max_bytes",
            format!("{} is out of range; use 64..={MAX_CAPTURE}", l.max_bytes),
        ));
    }
    if l.flush_ms == 0 || l.flush_ms > 10_000 {
        return Err(ConfigError::new("logs.flush_ms", "use 1..=10000 milliseconds, e.g. 100"));
    }
    let mut files = Vec::new();
    for (i, g) in l.files.iter().enumerate() {
        if !g.starts_with('/') {
            return Err(ConfigError::new(
                format!("logs.files[{i}]"),
                format!("{g:?} must be an absolute path glob, e.g. /var/log/app/*.log"),
            ));
        }
        files.push(compile_glob(g).map_err(|m| ConfigError::new(format!("logs.files[{i}]"), m))?);
    }
    let redaction = crate::logs::redact::Redactor::new(l.redact_defaults, &l.redact).map_err(|(i, m)| {
        ConfigError::new(format!("logs.redact[{i}]"), format!("{m}; write a regular expression (Rust regex syntax)"))
    })?;
    // The logs exporter shares the trace exporter's file settings, with its own batch sizes.
    let otlp_file =
        OtlpFileConfig { queue_spans: l.queue_records, batch_spans: l.batch_records, ..file.export.otlp.clone() };
    let otlp = OtlpSettings::for_signal(crate::export::otlp::Signal::Logs, &otlp_file, env).map_err(|e| {
        let key = if e.key == "export.otlp.batch_spans" { "logs.batch_records".to_string() } else { e.key };
        let message = e.message.replace("batch_spans <= queue_spans", "batch_records <= queue_records");
        ConfigError::new(key, message)
    })?;
    let otlp = match env("OTEL_LOGS_EXPORTER").as_deref().map(str::trim) {
        None | Some("otlp") => otlp,
        Some("none") => None,
        Some(other) => {
            return Err(ConfigError::new(
                "OTEL_LOGS_EXPORTER",
                format!("{other:?} is not supported; use otlp (default) or none"),
            ));
        }
    };
    Ok(LogSettings {
        files,
        max_bytes: l.max_bytes,
        flush: std::time::Duration::from_millis(l.flush_ms),
        redaction,
        otlp,
    })
}

/// What a validated configuration resolves to, for `sonde config`. Header values are never
/// shown (they often carry API keys).
pub fn describe(c: &AgentConfig) -> String {
    use std::fmt::Write;
    let mut out = String::from("configuration is valid\n");
    let _ = writeln!(out, "selectors: {}", c.selectors.len());
    for (i, s) in c.selectors.iter().enumerate() {
        let _ = writeln!(out, "  {}. {s}", i + 1);
    }
    let _ = writeln!(out, "excludes: {}", c.excludes.len());
    for (i, s) in c.excludes.iter().enumerate() {
        let _ = writeln!(out, "  {}. {s}", i + 1);
    }
    let _ = writeln!(
        out,
        "kubernetes: {} (node {}{})",
        if crate::k8s::api_configured() { "API configured" } else { "no API configured (no pod metadata)" },
        c.kubernetes.node_name,
        c.kubernetes.cluster_name.as_ref().map(|n| format!(", cluster {n}")).unwrap_or_default()
    );
    let _ = writeln!(out, "print: {:?}", c.print);
    let _ = writeln!(
        out,
        "traceparent injection: {}",
        if c.inject_http { "on (outgoing HTTP/1.x requests of traced processes)" } else { "off" }
    );
    let otlp = |o: &OtlpSettings| format!("{} ({:?}, {} headers)", o.endpoint, o.protocol, o.headers.len());
    let _ = writeln!(
        out,
        "logs: {}",
        match &c.logs {
            None => "not captured".to_string(),
            Some(l) => format!(
                "stdout, stderr{} ({} bytes per write, {} redaction rules), {}",
                if l.files.is_empty() {
                    String::new()
                } else {
                    format!(" and {}", l.files.iter().map(|g| g.glob().to_string()).collect::<Vec<_>>().join(", "))
                },
                l.max_bytes,
                l.redaction.rule_count(),
                l.otlp.as_ref().map(otlp).unwrap_or_else(|| "not exported".into())
            ),
        }
    );
    let _ = writeln!(out, "traces: {}", c.otlp.as_ref().map(otlp).unwrap_or_else(|| "not exported".into()));
    let _ = writeln!(
        out,
        "otlp metrics: {}",
        c.otlp_metrics
            .as_ref()
            .map(|(o, every)| format!("{} every {}s", otlp(o), every.as_secs_f64()))
            .unwrap_or_else(|| "not exported".into())
    );
    let _ = writeln!(
        out,
        "prometheus: {}",
        c.prometheus.map(|a| format!("http://{a}/metrics")).unwrap_or_else(|| "no endpoint".into())
    );
    let _ = writeln!(out, "metrics.max_series: {}", c.max_series);
    let _ = writeln!(
        out,
        "capture: max_bytes={} ring_buffer_bytes={} tls={}",
        c.capture.max_bytes, c.capture.ring_buffer_bytes, c.capture.tls
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn full_file_parses() {
        let f = parse_file(
            "discovery:\n  - service.name: web\n    open_ports: 8080\n  - exe_path: \"*/nginx\"\n    open_ports: \"80,9000-9100\"\ncapture:\n  max_bytes: 2048\nexport:\n  print: json\n  otlp:\n    endpoint: http://localhost:4318\n    protocol: http/protobuf\n",
        )
        .unwrap();
        let c = build(f, CliSelection::default(), &no_env).unwrap();
        assert_eq!(c.selectors.len(), 2);
        assert_eq!(c.selectors[0].service_name.as_deref(), Some("web"));
        assert_eq!(c.capture.max_bytes, 2048);
        assert_eq!(c.print, PrintMode::Json);
        assert_eq!(c.otlp.unwrap().endpoint, "http://localhost:4318/v1/traces");
    }

    #[test]
    fn injection_is_off_unless_the_file_or_the_flag_asks() {
        let off = build(parse_file("discovery:\n  - pid: [1]\n").unwrap(), CliSelection::default(), &no_env).unwrap();
        assert!(!off.inject_http);
        let file = parse_file("discovery:\n  - pid: [1]\npropagation:\n  inject_http: true\n").unwrap();
        assert!(build(file, CliSelection::default(), &no_env).unwrap().inject_http);
        let cli = CliSelection { pids: vec![1], inject_traceparent: true, ..Default::default() };
        assert!(build(FileConfig::default(), cli, &no_env).unwrap().inject_http);
        assert_eq!(parse_file("propagation:\n  inject: true\n").unwrap_err().key, "inject");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse_file("capture:\n  max_byte: 10\n").unwrap_err();
        assert_eq!(e.key, "max_byte");
        assert!(e.message.contains("expected one of") && e.message.contains("max_bytes"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let f = parse_file("discovery:\n  - open_ports: \"9100-9000\"\n").unwrap();
        let e = build(f, CliSelection::default(), &no_env).unwrap_err();
        assert_eq!(e.key, "discovery[0].open_ports");
        let cli = CliSelection { exe_path: Some("[".into()), ..Default::default() };
        assert_eq!(build(FileConfig::default(), cli, &no_env).unwrap_err().key, "--exe-path");
        let e = build(FileConfig::default(), CliSelection::default(), &no_env).unwrap_err();
        assert_eq!(e.key, "discovery");
        let f = parse_file("discovery:\n  - pid: [1]\ncapture:\n  max_bytes: 100000\n").unwrap();
        assert_eq!(build(f, CliSelection::default(), &no_env).unwrap_err().key, "capture.max_bytes");
    }

    #[test]
    fn text_printing_is_the_default_without_an_endpoint() {
        let cli = CliSelection { pids: vec![1], ..Default::default() };
        assert_eq!(build(FileConfig::default(), cli, &no_env).unwrap().print, PrintMode::Text);
        let env = |k: &str| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://collector:4317".to_owned());
        let cli = CliSelection { pids: vec![1], ..Default::default() };
        assert_eq!(build(FileConfig::default(), cli, &env).unwrap().print, PrintMode::None);
    }

    #[test]
    fn metrics_follow_the_traces_endpoint_unless_disabled() {
        let cli = || CliSelection { pids: vec![1], ..Default::default() };
        let base = |k: &str| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://collector:4318".to_owned());
        let (m, every) = build(FileConfig::default(), cli(), &base).unwrap().otlp_metrics.unwrap();
        assert_eq!(m.endpoint, "http://collector:4318/v1/metrics");
        assert_eq!(every, std::time::Duration::from_secs(60));
        let off = |k: &str| match k {
            "OTEL_METRICS_EXPORTER" => Some("none".to_owned()),
            _ => base(k),
        };
        assert!(build(FileConfig::default(), cli(), &off).unwrap().otlp_metrics.is_none());
        let bad = |k: &str| match k {
            "OTEL_METRICS_EXPORTER" => Some("console".to_owned()),
            _ => base(k),
        };
        assert_eq!(build(FileConfig::default(), cli(), &bad).unwrap_err().key, "OTEL_METRICS_EXPORTER");
        let traces_only =
            |k: &str| (k == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").then(|| "http://c:4318/v1/traces".to_owned());
        assert!(build(FileConfig::default(), cli(), &traces_only).unwrap().otlp_metrics.is_none());
    }
}
