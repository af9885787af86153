//! Kubernetes identity: real Python servers run in real cgroup directories named as kubelet and
//! containerd name them (v1 `pids` and v2 hierarchies), a stand-in API server speaks the real
//! list/watch protocol, and sonde names, selects and describes each pod's spans from both.

use std::{collections::BTreeMap, time::Duration};

use serde_json::{Value, json};
use sonde_e2e::{
    clients::{curl, scrape},
    free_port,
    kube::{ApiStandIn, ContainerCgroup, Layout, PodSpec, owner_object, pod},
    otlp::HttpReceiver,
    privileged_test,
    servers::{Server, fixture},
    sonde::{Sonde, test_config},
    span::{TestSpan, V},
    wait_for,
};

const NODE: &str = "node-a";
const WAIT: Duration = Duration::from_secs(20);

fn uid(i: u32) -> String {
    format!("{i:08x}-aaaa-4bbb-8ccc-0123456789ab")
}

fn container_id(i: u32) -> String {
    format!("{:064x}", 0x00c0_ffee_0000_u64 + u64::from(i))
}

/// One pod of the test: its cgroup, its server, its object in the API.
struct TestPod {
    port: u16,
    ip: String,
    uid: String,
    container_id: String,
    object: Value,
    // Held for their drops, in this order: the server stops before its cgroup directories go.
    _server: Server,
    _cgroup: ContainerCgroup,
}

#[derive(Default)]
struct Shape<'a> {
    name: &'a str,
    namespace: &'a str,
    labels: Value,
    annotations: Value,
    owner: Option<(&'a str, &'a str)>,
    env: Vec<(&'a str, &'a str)>,
    /// More arguments to http_server.py.
    args: Vec<String>,
}

/// The pod IP of test pod `i`: on loopback (all of 127/8 reaches lo), so other pods can call it.
fn pod_ip(i: u32) -> String {
    format!("127.0.0.{}", 10 + i)
}

fn test_pod(i: u32, layout: Layout, shape: Shape<'_>) -> TestPod {
    let (uid, container_id, port) = (uid(i), container_id(i), free_port());
    let cgroup = ContainerCgroup::create(layout, &uid, &container_id);
    let object = pod(&PodSpec {
        name: shape.name,
        namespace: shape.namespace,
        uid: &uid,
        node: NODE,
        labels: if shape.labels.is_null() { json!({}) } else { shape.labels },
        annotations: if shape.annotations.is_null() { json!({}) } else { shape.annotations },
        owner: shape.owner,
        container: Some(("app", &container_id)),
        ip: &pod_ip(i),
    });
    let script = fixture("http_server.py");
    // Each pod listens on its own IP, as in a cluster.
    let mut args = vec![script.display().to_string(), port.to_string(), "--bind".into(), pod_ip(i)];
    args.extend(shape.args);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = cgroup.spawn_python(&args, format!("{}:{port}", pod_ip(i)).parse().unwrap(), &shape.env);
    TestPod { port, ip: pod_ip(i), uid, container_id, object, _server: server, _cgroup: cgroup }
}

fn requests(ip: &str, port: u16, n: usize) {
    let urls: Vec<String> = (0..n).map(|i| format!("http://{ip}:{port}/k8s/{i}")).collect();
    curl(&["-o", "/dev/null"], &urls);
}

fn on_port(spans: &[TestSpan], port: u16) -> Vec<&TestSpan> {
    spans.iter().filter(|s| s.kind == "SERVER" && s.i("server.port") == Some(i64::from(port))).collect()
}

fn res<'a>(span: &'a TestSpan, key: &str) -> Option<&'a str> {
    match span.resource.get(key) {
        Some(V::S(s)) => Some(s),
        _ => None,
    }
}

fn gauge(prometheus_port: u16, name: &str) -> Option<u64> {
    scrape(prometheus_port).lines().find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
}

fn sonde_for(api: &ApiStandIn, receiver: &HttpReceiver, prometheus: u16, discovery: &str) -> Sonde {
    let config = test_config(&format!("kubernetes:\n  cluster_name: eu-test\ndiscovery:\n{discovery}"));
    Sonde::start(
        &["--prometheus-port", &prometheus.to_string()],
        &config,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
            ("KUBECONFIG", api.kubeconfig().display().to_string()),
            ("NODE_NAME", NODE.into()),
        ],
    )
}

#[test]
fn privileged_pods_are_named_described_and_selected_from_cgroups_and_the_api() {
    let Some(_guard) = privileged_test("kubernetes identity") else {
        return;
    };
    let api = ApiStandIn::start();
    // 10,000 pods on other nodes: sonde must never receive them.
    let elsewhere: Vec<Value> = (0..10_000u32)
        .map(|i| {
            pod(&PodSpec {
                name: &format!("other-{i}"),
                namespace: "shop",
                uid: &format!("{i:08x}-ffff-4fff-8fff-0123456789ab"),
                node: &format!("node-{}", i % 50 + 1),
                labels: json!({"tier": "backend", "app.kubernetes.io/name": "other"}),
                annotations: json!({}),
                owner: None,
                container: None,
                ip: &format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256),
            })
        })
        .collect();
    api.add_pods(&elsewhere);
    api.add_object(&owner_object("ReplicaSet", "shop", "orders-7d9f8b6c5", Some(("Deployment", "orders"))));
    api.add_object(&owner_object("Job", "shop", "report-29100", Some(("CronJob", "report"))));

    let labelled = test_pod(
        2,
        Layout::CgroupfsPids,
        Shape {
            name: "payments-0",
            namespace: "shop",
            labels: json!({"app.kubernetes.io/name": "payments", "app.kubernetes.io/version": "2.1.0"}),
            owner: Some(("StatefulSet", "payments")),
            ..Default::default()
        },
    );
    let annotated = test_pod(
        1,
        Layout::SystemdUnified,
        Shape {
            name: "orders-7d9f8b6c5-x2x7k",
            namespace: "shop",
            annotations: json!({"resource.opentelemetry.io/service.name": "checkout"}),
            labels: json!({"app.kubernetes.io/name": "orders"}),
            owner: Some(("ReplicaSet", "orders-7d9f8b6c5")),
            // Calls payments by its pod IP.
            args: vec!["--backend".into(), format!("{}:{}", pod_ip(2), labelled.port)],
            ..Default::default()
        },
    );
    let cron = test_pod(
        3,
        Layout::SystemdUnified,
        Shape {
            name: "report-29100-abcde",
            namespace: "shop",
            owner: Some(("Job", "report-29100")),
            ..Default::default()
        },
    );
    let bare = test_pod(4, Layout::CgroupfsPids, Shape { name: "scratch", namespace: "shop", ..Default::default() });
    let own_name = test_pod(
        5,
        Layout::SystemdUnified,
        Shape {
            name: "named-1",
            namespace: "shop",
            labels: json!({"app.kubernetes.io/name": "ignored"}),
            env: vec![("OTEL_SERVICE_NAME", "from-env")],
            ..Default::default()
        },
    );
    let web_backend = test_pod(
        6,
        Layout::CgroupfsPids,
        Shape { name: "api-1", namespace: "web", labels: json!({"tier": "backend"}), ..Default::default() },
    );
    let web_frontend = test_pod(
        7,
        Layout::CgroupfsPids,
        Shape { name: "ui-1", namespace: "web", labels: json!({"tier": "frontend"}), ..Default::default() },
    );
    let system = test_pod(
        8,
        Layout::SystemdUnified,
        Shape { name: "coredns-1", namespace: "kube-system", labels: json!({"tier": "backend"}), ..Default::default() },
    );
    let pods = [&annotated, &labelled, &cron, &bare, &own_name, &web_backend, &web_frontend, &system];
    api.add_pods(&pods.iter().map(|p| p.object.clone()).collect::<Vec<_>>());

    let receiver = HttpReceiver::start();
    let prometheus = free_port();
    // Selected: the namespace shop, and any pod labelled tier=back* (kube-system is excluded by
    // default, so coredns is not).
    let sonde =
        sonde_for(&api, &receiver, prometheus, "  - k8s_namespace: shop\n  - k8s_pod_labels:\n      tier: \"back*\"\n");
    for p in pods {
        requests(&p.ip, p.port, 3);
    }
    let traced = [&annotated, &labelled, &cron, &bare, &own_name, &web_backend];
    let spans = receiver.collected.wait_for(3 * traced.len(), WAIT);
    for p in traced {
        assert_eq!(on_port(&spans, p.port).len(), 3, "pod {}: {spans:#?}", p.uid);
    }
    for p in [&web_frontend, &system] {
        assert!(on_port(&spans, p.port).is_empty(), "pod {} is not selected: {:#?}", p.uid, on_port(&spans, p.port));
    }
    assert_eq!(spans.len(), 3 * traced.len(), "no other spans");

    // service.name by each rule of the order.
    let service =
        |p: &TestPod| on_port(&spans, p.port).iter().map(|s| s.service().unwrap_or("").to_owned()).collect::<Vec<_>>();
    assert_eq!(service(&own_name), vec!["from-env"; 3], "1. the process's OTEL_SERVICE_NAME");
    assert_eq!(service(&annotated), vec!["checkout"; 3], "2. the annotation");
    assert_eq!(service(&labelled), vec!["payments"; 3], "3. the app.kubernetes.io/name label");
    assert_eq!(service(&cron), vec!["report"; 3], "4. the workload: the Job's CronJob");
    assert_eq!(service(&bare), vec!["scratch"; 3], "5. the pod name");

    // Every attribute, from the cgroup (container.*, pod uid) and the API (the rest).
    let s = on_port(&spans, annotated.port)[0];
    let want: BTreeMap<&str, &str> = [
        ("container.id", annotated.container_id.as_str()),
        ("container.runtime.name", "containerd"),
        ("k8s.pod.uid", annotated.uid.as_str()),
        ("k8s.pod.name", "orders-7d9f8b6c5-x2x7k"),
        ("k8s.namespace.name", "shop"),
        ("k8s.container.name", "app"),
        ("k8s.node.name", NODE),
        ("k8s.replicaset.name", "orders-7d9f8b6c5"),
        ("k8s.deployment.name", "orders"),
        ("k8s.cluster.name", "eu-test"),
        ("service.namespace", "shop"),
        ("process.executable.name", "python3.11"),
    ]
    .into();
    for (k, v) in &want {
        assert_eq!(res(s, k), Some(*v), "{k} in {:#?}", s.resource);
    }
    let s = on_port(&spans, labelled.port)[0];
    assert_eq!(res(s, "container.id"), Some(labelled.container_id.as_str()));
    assert_eq!(res(s, "container.runtime.name"), None, "kubelet's cgroupfs layout does not name the runtime");
    assert_eq!(res(s, "k8s.statefulset.name"), Some("payments"));
    assert_eq!(res(s, "service.version"), Some("2.1.0"));
    let s = on_port(&spans, cron.port)[0];
    assert_eq!((res(s, "k8s.job.name"), res(s, "k8s.cronjob.name")), (Some("report-29100"), Some("report")));
    assert_eq!(res(on_port(&spans, bare.port)[0], "k8s.deployment.name"), None);

    // A call to another pod's IP names that pod's service as the server.
    curl(&["-o", "/dev/null"], &[format!("http://{}:{}/call/peer", annotated.ip, annotated.port)]);
    let spans = receiver.collected.wait_for(3 * traced.len() + 3, WAIT);
    let clients: Vec<&TestSpan> = spans.iter().filter(|s| s.kind == "CLIENT").collect();
    assert_eq!(clients.len(), 1, "{spans:#?}");
    assert_eq!(clients[0].s("server.address"), Some("payments"), "{:#?}", clients[0]);
    assert_eq!(clients[0].i("server.port"), Some(i64::from(labelled.port)));
    assert_eq!(clients[0].s("network.peer.address"), Some(pod_ip(2).as_str()));
    assert_eq!(clients[0].service(), Some("checkout"));

    // Only this node's pods were listed and are held.
    assert_eq!(wait_for(WAIT, || (gauge(prometheus, "sonde_k8s_pods_cached") == Some(8)).then_some(())), Some(()));
    let served = api.requests();
    let lists: Vec<&Value> =
        served.iter().filter(|r| r["path"].as_str().unwrap().starts_with("/api/v1/pods")).collect();
    assert!(!lists.is_empty());
    for r in &lists {
        assert!(r["path"].as_str().unwrap().contains("fieldSelector=spec.nodeName%3Dnode-a"), "unfiltered: {r}");
    }
    let bytes: u64 = lists.iter().map(|r| r["bytes"].as_u64().unwrap()).sum();
    assert!(bytes < 64 * 1024, "10,000 pods elsewhere cost {bytes} bytes of pod lists and watches");
    // Reported, not asserted (memory targets belong in benchmarks).
    println!("sonde: {bytes} bytes of pod lists and watches, RSS {} KiB, 8 pods cached", sonde.rss_kib());

    // `sonde check` with the same configuration names each selected process's pod and
    // container, as `run` resolved them, and lists no other pod.
    let check = std::process::Command::new(sonde_e2e::sonde::binary())
        .arg("check")
        .arg("--config")
        .arg(sonde.config_path())
        .env("KUBECONFIG", api.kubeconfig())
        .env("NODE_NAME", NODE)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("OTEL_SERVICE_NAME")
        .output()
        .expect("run sonde check");
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{report}\n{}", String::from_utf8_lossy(&check.stderr));
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("[ok  ] kubernetes") && l.ends_with(" 8 pods on node node-a listed by the API")),
        "{report}"
    );
    let line_of =
        |p: &TestPod| report.lines().find(|l| l.contains(&format!("k8s.pod.uid={} ", p.uid))).map(str::to_owned);
    for (p, service) in [
        (&annotated, "checkout"),
        (&labelled, "payments"),
        (&cron, "report"),
        (&bare, "scratch"),
        (&own_name, "from-env"),
        (&web_backend, "api-1"),
    ] {
        let line = line_of(p).unwrap_or_else(|| panic!("no process line for pod {}: {report}", p.uid));
        assert!(line.starts_with("[ok  ] process"), "{line}");
        for part in [
            format!("service.name={service} "),
            format!("container.id={} ", p.container_id),
            "k8s.container.name=app ".to_owned(),
            "k8s.node.name=node-a ".to_owned(),
        ] {
            assert!(line.contains(&part), "{part:?} in {line}");
        }
    }
    let payments = line_of(&labelled).unwrap_or_default();
    assert!(payments.contains("k8s.namespace.name=shop k8s.pod.name=payments-0 "), "{payments}");
    assert!(payments.contains("k8s.statefulset.name=payments "), "{payments}");
    for p in [&web_frontend, &system] {
        assert!(line_of(p).is_none(), "pod {} is not selected: {report}", p.uid);
    }
    let finished = sonde.stop();
    assert_eq!(finished.counter("k8s_api_errors"), Some(0), "{}", finished.stderr);
}

#[test]
fn privileged_pods_come_and_go_and_the_api_may_vanish() {
    let Some(_guard) = privileged_test("kubernetes pod lifecycle") else {
        return;
    };
    let mut api = ApiStandIn::start();
    let first = test_pod(21, Layout::CgroupfsPids, Shape { name: "first-1", namespace: "shop", ..Default::default() });
    api.add_pods(std::slice::from_ref(&first.object));
    let receiver = HttpReceiver::start();
    let prometheus = free_port();
    let sonde = sonde_for(&api, &receiver, prometheus, "  - k8s_namespace: shop\n");

    // A pod scheduled after sonde started, as kubelet runs it: the pod object first, without a
    // container status; the container's process; then the status with its container id.
    let (late_uid, late_cid, late_port) = (uid(22), container_id(22), free_port());
    let late_cgroup = ContainerCgroup::create(Layout::SystemdUnified, &late_uid, &late_cid);
    let spec = |container| PodSpec {
        name: "late-1",
        namespace: "shop",
        uid: &late_uid,
        node: NODE,
        labels: json!({}),
        annotations: json!({}),
        owner: None,
        container,
        ip: "10.244.1.90",
    };
    api.add_pods(&[pod(&spec(None))]);
    assert_eq!(wait_for(WAIT, || (gauge(prometheus, "sonde_k8s_pods_cached") == Some(2)).then_some(())), Some(()));
    let script = fixture("http_server.py");
    let started = std::time::Instant::now();
    let late = late_cgroup.spawn_python(
        &[script.to_str().unwrap(), &late_port.to_string()],
        format!("127.0.0.1:{late_port}").parse().unwrap(),
        &[],
    );
    api.add_pods(&[pod(&spec(Some(("worker", &late_cid))))]);
    // Traced within a second of its process starting.
    std::thread::sleep(Duration::from_secs(1).saturating_sub(started.elapsed()));
    requests("127.0.0.1", late_port, 2);
    requests(&first.ip, first.port, 2);
    let spans = receiver.collected.wait_for(4, WAIT);
    let late_spans = on_port(&spans, late_port);
    assert_eq!(late_spans.len(), 2, "{spans:#?}");
    assert_eq!(on_port(&spans, first.port).len(), 2);
    assert_eq!(res(late_spans[0], "k8s.pod.name"), Some("late-1"));
    assert_eq!(late_spans[0].service(), Some("late-1"));
    // The container's name arrived with its status and renamed nothing.
    assert!(
        wait_for(WAIT, || {
            requests("127.0.0.1", late_port, 1);
            let spans = receiver.collected.spans();
            on_port(&spans, late_port)
                .last()
                .is_some_and(|s| res(s, "k8s.container.name") == Some("worker"))
                .then_some(())
        })
        .is_some(),
        "the container status reaches the resource"
    );

    // A deleted pod leaves no cache entry.
    api.delete_pod(&late_uid);
    assert_eq!(wait_for(WAIT, || (gauge(prometheus, "sonde_k8s_pods_cached") == Some(1)).then_some(())), Some(()));
    drop(late);
    drop(late_cgroup);

    // History compacted: the resumed watch gets 410 Gone and sonde lists again.
    let relists_before = gauge(prometheus, "sonde_k8s_relists_total").unwrap_or(0);
    api.compact();
    assert!(
        wait_for(WAIT, || (gauge(prometheus, "sonde_k8s_relists_total").unwrap_or(0) > relists_before).then_some(()))
            .is_some(),
        "410 Gone leads to a relist"
    );
    assert_eq!(gauge(prometheus, "sonde_k8s_pods_cached"), Some(1));

    // The API goes away: tracing goes on with the cached pod, and the errors are counted.
    api.stop();
    let before = receiver.collected.len();
    requests(&first.ip, first.port, 3);
    let spans = receiver.collected.wait_for(before + 3, WAIT);
    let after: Vec<&TestSpan> = on_port(&spans[before..], first.port);
    assert_eq!(after.len(), 3, "{spans:#?}");
    assert!(after.iter().all(|s| res(s, "k8s.pod.name") == Some("first-1")));
    assert!(
        wait_for(WAIT, || (gauge(prometheus, "sonde_k8s_api_errors_total").unwrap_or(0) > 0).then_some(())).is_some(),
        "a vanished API is counted"
    );
    // It comes back empty, its history lost: the resumed watch gets 410, the relist shows no
    // pods, and the cache drops the one it kept.
    api.restart();
    assert_eq!(
        wait_for(Duration::from_secs(60), || (gauge(prometheus, "sonde_k8s_pods_cached") == Some(0)).then_some(())),
        Some(())
    );
    let finished = sonde.stop();
    assert!(finished.status.success(), "{}", finished.stderr);
    drop(first);
}
