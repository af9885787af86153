//! Static checks of deploy/ that can fail: every YAML/JSON parses, promtool accepts the
//! Prometheus config and proves the alerts fire, Kubernetes manifests and Helm renders are valid
//! objects against the API schema (offline), sonde accepts every config shipped, and every
//! metric and label the dashboard and rules use is one sonde really exports.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_yaml::Value;
use sonde_e2e::{
    TempDir,
    clients::{Launcher, curl},
    free_port, privileged_test,
    promql::{Names, exposition_names, names},
    servers,
    sonde::{Sonde, binary, test_config},
    wait_for,
};

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// True when `tool` runs; otherwise says the test was not run (a failure in CI, where
/// `cargo xtask setup` installs it).
fn have(tool: &str, version_arg: &str) -> bool {
    let ok = Command::new(tool).arg(version_arg).output().is_ok_and(|o| o.status.success());
    if !ok {
        let msg = format!("{tool} is missing: run `cargo xtask setup`");
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        eprintln!("NOT RUN: {msg}");
    }
    ok
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = entry.path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn yaml_docs(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("YAML does not parse: {e}\n{text}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// `sonde config` accepts this configuration (exit 0), with no OTEL_* from the test's env.
fn sonde_accepts(config_text: &str) -> String {
    let dir = TempDir::new("config");
    let path = dir.path().join("sonde.yaml");
    std::fs::write(&path, config_text).expect("write config");
    let mut cmd = Command::new(binary());
    cmd.arg("config").arg("--config").arg(&path);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("OTEL_")) {
        cmd.env_remove(k);
    }
    let out = run_ok(&mut cmd);
    assert!(out.contains("configuration is valid"), "{out}");
    out
}

#[test]
fn every_yaml_and_json_in_deploy_parses() {
    let mut all = Vec::new();
    files(&deploy(), &mut all);
    let mut parsed = 0;
    for p in &all {
        // Helm templates are Go templates, checked by rendering them below.
        if p.components().any(|c| c.as_os_str() == "templates") {
            continue;
        }
        match p.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => {
                assert!(!yaml_docs(&read(p)).is_empty(), "{} is empty", p.display());
                parsed += 1;
            }
            Some("json") => {
                serde_json::from_str::<serde_json::Value>(&read(p))
                    .unwrap_or_else(|e| panic!("{} does not parse: {e}", p.display()));
                parsed += 1;
            }
            _ => {}
        }
    }
    assert!(parsed >= 15, "only {parsed} YAML/JSON files found under deploy/");
}

#[test]
fn example_configs_are_accepted_by_sonde() {
    let summary = sonde_accepts(&read(&deploy().join("sonde.yaml")));
    assert!(summary.contains("selectors: 3"), "{summary}");
    let compose = sonde_accepts(&read(&deploy().join("compose/sonde.yaml")));
    assert!(compose.contains("prometheus: http://0.0.0.0:9464/metrics"), "{compose}");
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool() {
    if !have("promtool", "--version") {
        return;
    }
    let prom = deploy().join("compose/prometheus");
    let out = run_ok(Command::new("promtool").arg("check").arg("config").arg(prom.join("prometheus.yml")));
    assert!(out.contains("6 rules found"), "{out}");
    run_ok(Command::new("promtool").arg("check").arg("rules").arg(prom.join("alerts.yml")));
    // Alerts fire on synthetic series (and stay quiet where they should).
    let out = run_ok(Command::new("promtool").arg("test").arg("rules").arg("alerts.test.yml").current_dir(&prom));
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn kubernetes_manifests_are_valid_objects() {
    if !have("kubernetes-validate", "--version") {
        return;
    }
    let dir = deploy().join("kubernetes");
    let mut manifests = Vec::new();
    files(&dir, &mut manifests);
    let out = run_ok(Command::new("kubernetes-validate").arg("--strict").args(&manifests));
    assert!(out.contains("for resource daemonset/sonde"), "{out}");
    let ds = yaml_docs(&read(&dir.join("daemonset.yaml"))).remove(0);
    check_daemonset(&ds);
    let rbac = yaml_docs(&read(&dir.join("rbac.yaml")));
    check_pod_watch_access(&rbac, &ds, "sonde");
    let cm = yaml_docs(&read(&dir.join("configmap.yaml"))).remove(0);
    sonde_accepts(cm["data"]["sonde.yaml"].as_str().expect("sonde.yaml in the ConfigMap"));
}

/// What the DaemonSet must keep: host PIDs, named capabilities instead of privileged, tracefs.
fn check_daemonset(ds: &Value) {
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostPID"], Value::Bool(true));
    let c = &spec["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], Value::Bool(false));
    let added: BTreeSet<&str> =
        sc["capabilities"]["add"].as_sequence().expect("capabilities").iter().filter_map(Value::as_str).collect();
    assert_eq!(added, BTreeSet::from(["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "SYS_RESOURCE"]));
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    assert!(c["resources"]["limits"]["memory"].is_string() && c["resources"]["requests"]["cpu"].is_string());
    let mounts: Vec<&str> =
        c["volumeMounts"].as_sequence().expect("mounts").iter().filter_map(|m| m["mountPath"].as_str()).collect();
    assert!(mounts.contains(&"/sys/kernel/tracing") && mounts.contains(&"/etc/sonde"), "{mounts:?}");
    let env: Vec<&str> = c["env"].as_sequence().expect("env").iter().filter_map(|e| e["name"].as_str()).collect();
    assert!(env.contains(&"OTEL_EXPORTER_OTLP_ENDPOINT"), "{env:?}");
}

/// The pod watch's access: a ServiceAccount the DaemonSet runs as, with its token mounted, bound
/// to a ClusterRole that reads pods and the two owner kinds sonde looks up, and nothing else.
fn check_pod_watch_access(objects: &[Value], ds: &Value, namespace: &str) {
    let find =
        |kind: &str| objects.iter().find(|o| o["kind"] == kind).unwrap_or_else(|| panic!("no {kind} in {objects:#?}"));
    let account = find("ServiceAccount")["metadata"]["name"].as_str().expect("account name");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], account);
    assert_eq!(pod["automountServiceAccountToken"], Value::Bool(true));
    let role = find("ClusterRole");
    let rules: BTreeSet<(String, String, String)> = role["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .flat_map(|r| {
            let list = |k: &str| -> Vec<String> {
                r[k].as_sequence().expect(k).iter().map(|v| v.as_str().expect("string").to_owned()).collect()
            };
            let (groups, resources, verbs) = (list("apiGroups"), list("resources"), list("verbs"));
            groups
                .iter()
                .flat_map(|g| resources.iter().flat_map(|r| verbs.iter().map(|v| (g.clone(), r.clone(), v.clone()))))
                .collect::<Vec<_>>()
        })
        .collect();
    let expected: BTreeSet<(String, String, String)> = [
        ("", "pods", "get"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("apps", "replicasets", "get"),
        ("batch", "jobs", "get"),
    ]
    .iter()
    .map(|(g, r, v)| ((*g).to_owned(), (*r).to_owned(), (*v).to_owned()))
    .collect();
    assert_eq!(rules, expected, "read-only, pods and owners only");
    let binding = find("ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], account);
    assert_eq!(binding["subjects"][0]["namespace"], namespace);
}

fn helm_template(args: &[&str]) -> Vec<Value> {
    let out = Command::new("helm")
        .args(["template", "sonde"])
        .arg(deploy().join("helm/sonde"))
        .args(args)
        .output()
        .expect("run helm");
    assert!(out.status.success(), "helm template failed: {}", String::from_utf8_lossy(&out.stderr));
    yaml_docs(&String::from_utf8_lossy(&out.stdout))
}

fn validate_objects(objects: &[Value]) {
    let dir = TempDir::new("rendered");
    let path = dir.path().join("rendered.yaml");
    let text: Vec<String> = objects.iter().map(|o| serde_yaml::to_string(o).expect("yaml")).collect();
    std::fs::write(&path, text.join("---\n")).expect("write rendered");
    let out = run_ok(Command::new("kubernetes-validate").arg("--strict").arg(&path));
    assert_eq!(out.matches(" passed ").count(), objects.len(), "{out}");
}

fn object<'a>(objects: &'a [Value], kind: &str, name_suffix: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"].as_str().is_some_and(|n| n.ends_with(name_suffix)))
        .unwrap_or_else(|| panic!("no {kind} *{name_suffix} rendered"))
}

#[test]
fn helm_chart_lints_and_renders_valid_objects() {
    if !have("helm", "version") || !have("kubernetes-validate", "--version") || !have("promtool", "--version") {
        return;
    }
    run_ok(Command::new("helm").arg("lint").arg("--strict").arg(deploy().join("helm/sonde")));

    // Defaults: DaemonSet, its config, the alert rules, the pod watch's account and role.
    let objects = helm_template(&["--namespace", "observability"]);
    assert_eq!(objects.len(), 6);
    validate_objects(&objects);
    check_daemonset(object(&objects, "DaemonSet", "sonde"));
    check_pod_watch_access(&objects, object(&objects, "DaemonSet", "sonde"), "observability");
    let config = object(&objects, "ConfigMap", "sonde")["data"]["sonde.yaml"].as_str().expect("config");
    let summary = sonde_accepts(config);
    assert!(summary.contains("prometheus: http://0.0.0.0:9464/metrics"), "{summary}");
    // The chart's alert rules at default thresholds are exactly the compose stack's.
    let rendered_rules = object(&objects, "ConfigMap", "-alerts")["data"]["alerts.yml"].as_str().expect("rules");
    let compose_rules = read(&deploy().join("compose/prometheus/alerts.yml"));
    assert_eq!(yaml_docs(rendered_rules), yaml_docs(&compose_rules), "Helm and compose alert rules differ");

    // Values users set: endpoint, thresholds, selectors, resources, tolerations, extra config.
    let objects = helm_template(&[
        "--set",
        "otlp.endpoint=http://collector.observability:4318",
        "--set",
        "alerts.latencyP95Seconds=0.3",
        "--set",
        "alerts.errorRatio=0.01",
        "--set",
        "selectors[0].exe_path=/usr/sbin/nginx",
        "--set",
        "selectors[0].service\\.name=edge",
        "--set",
        "resources.limits.memory=128Mi",
        "--set",
        "tolerations[0].key=dedicated",
        "--set",
        "tolerations[0].operator=Exists",
        "--set",
        "extraConfig.capture.max_bytes=1024",
    ]);
    validate_objects(&objects);
    let ds = object(&objects, "DaemonSet", "sonde");
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    let endpoint = c["env"].as_sequence().expect("env").iter().find(|e| e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT");
    assert_eq!(endpoint.expect("endpoint")["value"], "http://collector.observability:4318");
    assert_eq!(c["resources"]["limits"]["memory"], "128Mi");
    assert_eq!(ds["spec"]["template"]["spec"]["tolerations"][0]["key"], "dedicated");
    let config = object(&objects, "ConfigMap", "sonde")["data"]["sonde.yaml"].as_str().expect("config");
    let summary = sonde_accepts(config);
    assert!(summary.contains("service.name=edge exe_path=/usr/sbin/nginx"), "{summary}");
    assert!(summary.contains("max_bytes=1024"), "{summary}");
    let rules = object(&objects, "ConfigMap", "-alerts")["data"]["alerts.yml"].as_str().expect("rules");
    assert!(rules.contains(") > 0.3\n") && rules.contains(") > 0.01\n"), "{rules}");
    let dir = TempDir::new("helm-rules");
    std::fs::write(dir.path().join("alerts.yml"), rules).expect("write rules");
    run_ok(Command::new("promtool").arg("check").arg("rules").arg(dir.path().join("alerts.yml")));

    // Injection adds what it needs, and only then.
    let objects = helm_template(&["--set", "propagation.injectHttp=true"]);
    validate_objects(&objects);
    let c = &object(&objects, "DaemonSet", "sonde")["spec"]["template"]["spec"]["containers"][0];
    let caps: Vec<&str> = c["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .expect("capabilities")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(caps.contains(&"NET_ADMIN"), "{caps:?}");
    let mounts: Vec<&str> =
        c["volumeMounts"].as_sequence().expect("mounts").iter().filter_map(|m| m["mountPath"].as_str()).collect();
    assert!(mounts.contains(&"/sys/fs/cgroup"), "{mounts:?}");
    let config = object(&objects, "ConfigMap", "sonde")["data"]["sonde.yaml"].as_str().expect("config");
    assert!(sonde_accepts(config).contains("traceparent injection: on"), "{config}");

    // Credentials and certificates come from Secrets: the header value never sits in the spec.
    let objects = helm_template(&[
        "--set",
        "otlp.endpoint=https://otlp.example:443",
        "--set",
        "otlp.headers=Authorization=inline",
        "--set",
        "otlp.headersSecret.name=otlp-auth",
        "--set",
        "otlp.compression=gzip",
        "--set",
        "otlp.tlsSecret.name=otlp-tls",
        "--set",
        "otlp.tlsSecret.clientCertificateKey=tls.crt",
        "--set",
        "otlp.tlsSecret.clientKeyKey=tls.key",
    ]);
    validate_objects(&objects);
    let pod = &object(&objects, "DaemonSet", "sonde")["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let env = |name: &str| c["env"].as_sequence().expect("env").iter().find(|e| e["name"] == name).cloned();
    let headers = env("OTEL_EXPORTER_OTLP_HEADERS").expect("headers env");
    assert_eq!(headers["valueFrom"]["secretKeyRef"]["name"], "otlp-auth");
    assert_eq!(headers["valueFrom"]["secretKeyRef"]["key"], "headers");
    assert!(headers.get("value").is_none(), "the Secret wins over the inline value");
    assert_eq!(env("OTEL_EXPORTER_OTLP_COMPRESSION").expect("compression")["value"], "gzip");
    assert_eq!(env("OTEL_EXPORTER_OTLP_CERTIFICATE").expect("ca")["value"], "/etc/sonde-tls/ca.crt");
    assert_eq!(env("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE").expect("cert")["value"], "/etc/sonde-tls/tls.crt");
    assert_eq!(env("OTEL_EXPORTER_OTLP_CLIENT_KEY").expect("key")["value"], "/etc/sonde-tls/tls.key");
    let mount = c["volumeMounts"].as_sequence().expect("mounts").iter().find(|m| m["name"] == "otlp-tls").cloned();
    assert_eq!(mount.expect("tls mount")["mountPath"], "/etc/sonde-tls");
    let volume = pod["volumes"].as_sequence().expect("volumes").iter().find(|v| v["name"] == "otlp-tls").cloned();
    assert_eq!(volume.expect("tls volume")["secret"]["secretName"], "otlp-tls");
    let defaults = helm_template(&[]);
    let c = &object(&defaults, "DaemonSet", "sonde")["spec"]["template"]["spec"]["containers"][0];
    let names: Vec<&str> = c["env"].as_sequence().expect("env").iter().filter_map(|e| e["name"].as_str()).collect();
    assert!(!names.contains(&"OTEL_EXPORTER_OTLP_CERTIFICATE"), "no TLS files unless asked: {names:?}");

    // Alerts can be turned off.
    let objects = helm_template(&["--set", "alerts.enabled=false"]);
    assert_eq!(objects.len(), 5);

    // Without Kubernetes metadata: no account, no role, no token in the pod.
    let objects = helm_template(&["--set", "kubernetes.enabled=false"]);
    assert_eq!(objects.len(), 3);
    assert!(objects.iter().all(|o| !o["kind"].as_str().unwrap_or("").contains("Role")));
    let pod = &object(&objects, "DaemonSet", "sonde")["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], Value::Bool(false));
    assert!(pod.get("serviceAccountName").is_none());

    // The shipped example selects by namespace and labels, excludes by annotation, names the cluster.
    let example = deploy().join("helm/sonde/examples/by-workload.yaml");
    let objects = helm_template(&["-f", example.to_str().expect("path")]);
    validate_objects(&objects);
    let config = object(&objects, "ConfigMap", "sonde")["data"]["sonde.yaml"].as_str().expect("config");
    let summary = sonde_accepts(config);
    for expected in [
        "1. k8s_namespace=shop",
        "2. service.name=checkout k8s_namespace=payments-* k8s_pod_labels.app.kubernetes.io/part-of=checkout",
        "excludes: 2",
        "k8s_pod_annotations.sonde.dev/trace=false",
        "cluster prod-eu-1",
    ] {
        assert!(summary.contains(expected), "{expected:?} in {summary}");
    }
}

#[test]
fn systemd_unit_verifies() {
    if !have("systemd-analyze", "--version") {
        return;
    }
    // systemd-analyze checks that ExecStart exists: point it at the binary just built.
    let unit = read(&deploy().join("systemd/sonde.service"));
    assert!(unit.contains("CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_SYS_PTRACE CAP_DAC_READ_SEARCH"));
    assert!(unit.contains("NoNewPrivileges=yes") && unit.contains("ProtectSystem=strict"));
    let dir = TempDir::new("systemd");
    let path = dir.path().join("sonde.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/sonde", &binary().display().to_string())).expect("write");
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().expect("verify");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let complaints: Vec<&str> = text.lines().filter(|l| l.contains("sonde.service")).collect();
    assert!(out.status.success() && complaints.is_empty(), "systemd-analyze verify:\n{text}");
}

#[test]
fn compose_stack_and_image_are_consistent() {
    let compose_dir = deploy().join("compose");
    let compose = yaml_docs(&read(&compose_dir.join("docker-compose.yaml"))).remove(0);
    let services = compose["services"].as_mapping().expect("services");
    for name in ["sonde", "otel-collector", "tempo", "loki", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "compose lacks {name}");
    }
    // Every file a service mounts exists.
    for (name, svc) in services {
        for v in svc["volumes"].as_sequence().map(Vec::as_slice).unwrap_or_default() {
            let src = v.as_str().and_then(|s| s.split(':').next()).unwrap_or("");
            if let Some(rel) = src.strip_prefix("./") {
                assert!(compose_dir.join(rel).exists(), "{name:?} mounts missing {src}");
            }
        }
    }
    // sonde: host PIDs, named capabilities, its config, and the port Prometheus scrapes.
    let sonde = &compose["services"]["sonde"];
    assert_eq!(sonde["pid"], "host");
    assert!(sonde["privileged"].is_null());
    let config = yaml_docs(&read(&compose_dir.join("sonde.yaml"))).remove(0);
    let port = config["metrics"]["prometheus"]["port"].as_u64().expect("port");
    let prom = yaml_docs(&read(&compose_dir.join("prometheus/prometheus.yml"))).remove(0);
    let job = &prom["scrape_configs"][0];
    assert_eq!(job["job_name"], "sonde", "SondeDown matches job=\"sonde\"");
    assert_eq!(job["static_configs"][0]["targets"][0].as_str(), Some(format!("sonde:{port}").as_str()));
    // Spans: sonde -> collector -> Tempo, on the ports each side listens on.
    let env = &sonde["environment"];
    assert_eq!(env["OTEL_EXPORTER_OTLP_ENDPOINT"], "http://otel-collector:4318");
    let collector = yaml_docs(&read(&compose_dir.join("otel-collector.yaml"))).remove(0);
    assert_eq!(collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"], "0.0.0.0:4318");
    assert_eq!(collector["exporters"]["otlp/tempo"]["endpoint"], "tempo:4317");
    let tempo = yaml_docs(&read(&compose_dir.join("tempo.yaml"))).remove(0);
    assert_eq!(tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"], "0.0.0.0:4317");
    // Grafana: both datasources, the trace-to-metrics link, and the dashboard provider path.
    let ds = yaml_docs(&read(&compose_dir.join("grafana/provisioning/datasources/datasources.yaml"))).remove(0);
    let uids: Vec<&str> =
        ds["datasources"].as_sequence().expect("datasources").iter().filter_map(|d| d["uid"].as_str()).collect();
    assert_eq!(uids, ["prometheus", "tempo", "loki"]);
    assert_eq!(ds["datasources"][1]["jsonData"]["tracesToMetrics"]["datasourceUid"], "prometheus");
    // Logs: sonde captures them, the collector sends them to Loki over OTLP, Loki keeps the
    // record's trace_id (structured metadata), and Grafana links both ways.
    assert_eq!(config["logs"]["capture"], true, "the compose sonde captures logs");
    let logs = &collector["service"]["pipelines"]["logs"];
    assert_eq!(logs["receivers"][0], "otlp");
    assert_eq!(logs["exporters"][0], "otlphttp/loki");
    assert_eq!(collector["exporters"]["otlphttp/loki"]["endpoint"], "http://loki:3100/otlp");
    let loki = yaml_docs(&read(&compose_dir.join("loki.yaml"))).remove(0);
    assert_eq!(loki["server"]["http_listen_port"], 3100);
    assert_eq!(loki["limits_config"]["allow_structured_metadata"], true, "OTLP ingestion needs structured metadata");
    assert_eq!(loki["schema_config"]["configs"][0]["schema"], "v13");
    assert_eq!(ds["datasources"][2]["url"], "http://loki:3100");
    let to_logs = &ds["datasources"][1]["jsonData"]["tracesToLogsV2"];
    assert_eq!((to_logs["datasourceUid"].as_str(), to_logs["customQuery"].as_bool()), (Some("loki"), Some(true)));
    // trace_id is structured metadata in Loki, not text in the line: a label filter finds it.
    let query = to_logs["query"].as_str().expect("trace-to-logs query");
    assert!(query.contains("| trace_id=\"$${__trace.traceId}\"") && query.contains("service_name="), "{query}");
    let to_trace = &ds["datasources"][2]["jsonData"]["derivedFields"][0];
    assert_eq!(
        (to_trace["matcherType"].as_str(), to_trace["matcherRegex"].as_str(), to_trace["datasourceUid"].as_str()),
        (Some("label"), Some("trace_id"), Some("tempo"))
    );
    // Exemplars: Prometheus keeps them, Grafana links their trace_id label to Tempo, and every
    // latency panel asks for them.
    let links = &ds["datasources"][0]["jsonData"]["exemplarTraceIdDestinations"][0];
    assert_eq!((links["name"].as_str(), links["datasourceUid"].as_str()), (Some("trace_id"), Some("tempo")));
    let flags = compose["services"]["prometheus"]["command"].as_sequence().expect("prometheus command");
    assert!(flags.iter().any(|f| f.as_str() == Some("--enable-feature=exemplar-storage")), "{flags:?}");
    let dash: serde_json::Value =
        serde_json::from_str(&read(&compose_dir.join("grafana/dashboards/sonde-red.json"))).expect("dashboard");
    let latency: Vec<&serde_json::Value> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["title"].as_str().is_some_and(|t| t.to_lowercase().contains("latency")))
        .collect();
    assert!(latency.len() >= 5, "latency panels: {}", latency.len());
    // The logs row: error lines per service, and the lines themselves. Loki's OTLP ingestion
    // makes service.name the `service_name` label and keeps severity_number as structured
    // metadata: the queries use exactly those.
    let loki_targets: Vec<&serde_json::Value> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["datasource"]["uid"] == "loki")
        .flat_map(|p| p["targets"].as_array().expect("targets"))
        .collect();
    assert_eq!(loki_targets.len(), 2, "an error-count panel and a logs panel");
    assert!(dash["panels"].as_array().expect("panels").iter().any(|p| p["type"] == "logs"));
    for t in loki_targets {
        let expr = t["expr"].as_str().expect("expr");
        assert!(expr.contains("{service_name=~\"$service\"}") && expr.contains("severity_number >= 17"), "{expr}");
    }
    for panel in latency {
        for t in panel["targets"].as_array().expect("targets") {
            assert_eq!(t["exemplar"], true, "panel {:?} shows exemplars", panel["title"]);
        }
    }
    // The image the stack builds: multi-stage, the binary copied from the build stage.
    let dockerfile = read(&deploy().join("Dockerfile"));
    assert_eq!(sonde["build"]["dockerfile"], "deploy/Dockerfile");
    assert_eq!(dockerfile.lines().filter(|l| l.starts_with("FROM ")).count(), 2, "multi-stage");
    assert!(dockerfile.contains("COPY --from=build /src/target/release/sonde /usr/local/bin/sonde"));
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/sonde\"]"));
}

/// Every PromQL expression deploy/ ships, with where it comes from.
/// What Grafana's service map (Tempo datasource, `serviceMap`) queries: Tempo's service-graph
/// series, by client and server.
const SERVICE_MAP_SERIES: [&str; 3] = [
    "sum by (client, server) (rate(traces_service_graph_request_total[5m]))",
    "sum by (client, server) (rate(traces_service_graph_request_failed_total[5m]))",
    "sum by (client, server, le) (rate(traces_service_graph_request_server_seconds_bucket[5m]))",
];

fn shipped_expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dash_path = deploy().join("compose/grafana/dashboards/sonde-red.json");
    let dash: serde_json::Value = serde_json::from_str(&read(&dash_path)).expect("dashboard");
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default() {
            if panel["datasource"]["uid"] == "loki" {
                // LogQL over Loki, checked in compose_stack_and_image_are_consistent.
                continue;
            }
            if t["queryType"] == "serviceMap" {
                // Tempo's service map: the series Grafana queries from the datasource it names.
                for expr in SERVICE_MAP_SERIES {
                    out.push((format!("service map of panel {:?}", panel["title"]), expr.to_string()));
                }
                continue;
            }
            out.push((format!("dashboard panel {:?}", panel["title"]), t["expr"].as_str().expect("expr").to_owned()));
        }
    }
    let ds = yaml_docs(&read(&deploy().join("compose/grafana/provisioning/datasources/datasources.yaml"))).remove(0);
    let tempo =
        ds["datasources"].as_sequence().expect("datasources").iter().find(|d| d["type"] == "tempo").expect("tempo");
    assert_eq!(tempo["jsonData"]["serviceMap"]["datasourceUid"], "prometheus", "the service map reads Prometheus");
    for v in dash["templating"]["list"].as_array().expect("variables") {
        let q = v["definition"].as_str().expect("definition");
        let inner = q.trim_start_matches("label_values(").trim_end_matches(')');
        let (metric, label) = inner.split_once(',').expect("label_values(metric, label)");
        out.push((format!("dashboard variable {}", v["name"]), format!("{metric}{{{}!=\"\"}}", label.trim())));
    }
    let rules = yaml_docs(&read(&deploy().join("compose/prometheus/alerts.yml"))).remove(0);
    for g in rules["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            out.push((format!("alert {:?}", r["alert"]), r["expr"].as_str().expect("expr").to_owned()));
        }
    }
    let ds = yaml_docs(&read(&deploy().join("compose/grafana/provisioning/datasources/datasources.yaml"))).remove(0);
    for d in ds["datasources"].as_sequence().expect("datasources") {
        for q in d["jsonData"]["tracesToMetrics"]["queries"].as_sequence().map(Vec::as_slice).unwrap_or_default() {
            out.push((format!("trace-to-metrics {:?}", q["name"]), q["query"].as_str().expect("query").to_owned()));
        }
    }
    out
}

#[test]
fn privileged_dashboard_and_rules_use_only_metrics_sonde_exports() {
    let Some(_guard) = privileged_test("dashboard metric names against sonde's real /metrics") else {
        return;
    };
    // Real traffic of every kind the dashboard shows: HTTP server (with a 5xx), HTTP client,
    // and Redis client operations (with an error).
    let http_port = free_port();
    let _http = servers::python_http(http_port, None);
    let redis_port = free_port();
    let _redis = servers::redis(redis_port);
    let mut launcher = Launcher::start();
    let metrics_port = free_port();
    let sonde = Sonde::start(
        &[
            "--open-ports",
            &http_port.to_string(),
            "--pid",
            &launcher.pid().to_string(),
            "--prometheus-port",
            &metrics_port.to_string(),
            "--print",
            "none",
        ],
        &test_config(""),
        &[],
    );
    assert_eq!(launcher.run(&format!("curl -s http://127.0.0.1:{http_port}/items/1")), 0);
    assert_eq!(launcher.run(&format!("curl -s http://127.0.0.1:{http_port}/status/500")), 0);
    assert_eq!(launcher.run(&format!("redis-cli -p {redis_port} SET k v")), 0);
    assert_eq!(launcher.run(&format!("redis-cli -p {redis_port} LPUSH k v")), 0);

    let scrape = || curl(&[], &[format!("http://127.0.0.1:{metrics_port}/metrics")]);
    let text = wait_for(Duration::from_secs(20), || {
        let t = scrape();
        let n = exposition_names(&t);
        (n.metrics.contains("db_client_operation_duration_seconds_bucket")
            && n.metrics.contains("http_client_request_duration_seconds_bucket")
            && n.metrics.contains("traces_service_graph_request_total")
            && n.labels.contains("db_response_status_code")
            && n.labels.contains("error_type"))
        .then_some(t)
    })
    .unwrap_or_else(|| panic!("sonde's /metrics never showed HTTP client and DB series:\n{}", scrape()));
    let exported = exposition_names(&text);
    // Labels Prometheus itself adds at scrape time or that histograms carry.
    let scrape_labels = ["job", "instance", "le"];

    let mut problems = Vec::new();
    let mut used = Names::default();
    for (origin, expr) in shipped_expressions() {
        let n = names(&expr);
        assert!(!n.metrics.is_empty(), "{origin}: no metric found in {expr}");
        for m in &n.metrics {
            if m != "up" && !exported.metrics.contains(m) {
                problems.push(format!("{origin}: metric {m} is not exported by sonde"));
            }
        }
        for l in &n.labels {
            if !scrape_labels.contains(&l.as_str()) && !exported.labels.contains(l) {
                problems.push(format!("{origin}: label {l} is not on any sonde series"));
            }
        }
        used.metrics.extend(n.metrics);
        used.labels.extend(n.labels);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The dashboard covers every RED family and sonde's loss counters.
    for m in [
        "http_server_request_duration_seconds_bucket",
        "http_server_request_duration_seconds_count",
        "http_client_request_duration_seconds_bucket",
        "db_client_operation_duration_seconds_bucket",
        "sonde_events_lost_total",
        "sonde_spans_dropped_total",
        "traces_service_graph_request_total",
    ] {
        assert!(used.metrics.contains(m), "nothing shipped uses {m}");
    }
    let finished = sonde.stop();
    assert!(finished.status.success(), "sonde exit: {:?}\n{}", finished.status, finished.stderr);
}
