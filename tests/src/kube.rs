//! Kubernetes for the tests: a stand-in API server (tests/fixtures/kube_api.py, the real list/
//! watch wire protocol), pod objects as a cluster returns them, and real cgroup directories
//! named as kubelet and containerd name them, for processes that serve real traffic.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use crate::{
    TempDir, free_port,
    servers::{Server, fixture},
    wait_listening,
};

/// The stand-in API server, on a loopback port.
pub struct ApiStandIn {
    pub port: u16,
    server: Option<Server>,
    dir: TempDir,
}

impl ApiStandIn {
    pub fn start() -> Self {
        let port = free_port();
        let mut api = Self { port, server: None, dir: TempDir::new("kubeapi") };
        api.restart();
        api
    }

    /// Starts it again on the same port, empty (after `stop`).
    pub fn restart(&mut self) {
        let child = Command::new("python3")
            .arg(fixture("kube_api.py"))
            .arg(self.port.to_string())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start kube_api.py");
        wait_listening(self.port);
        self.server = Some(Server::from_child(child, self.port));
    }

    /// The API going away: connections reset, nothing listens.
    pub fn stop(&mut self) {
        self.server = None;
    }

    /// A kubeconfig pointing at this server over plain http (as `kubectl proxy` serves).
    pub fn kubeconfig(&self) -> PathBuf {
        let path = self.dir.path().join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: http://127.0.0.1:{}\n\
             contexts:\n- name: standin\n  context:\n    cluster: standin\n    user: standin\n\
             current-context: standin\nusers:\n- name: standin\n  user: {{}}\n",
            self.port
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    pub fn add_pods(&self, pods: &[Value]) {
        self.post("/_test/pods", &Value::Array(pods.to_vec()));
    }

    pub fn add_object(&self, object: &Value) {
        self.post("/_test/objects", object);
    }

    pub fn delete_pod(&self, uid: &str) {
        self.call(&["-X", "DELETE"], &format!("/_test/pods/{uid}"));
    }

    /// Forgets the event history and ends every watch: the next resume gets `410 Gone`.
    pub fn compact(&self) {
        self.call(&["-X", "POST"], "/_test/compact");
    }

    /// Every API request served so far: `{"path", "bytes"}`.
    pub fn requests(&self) -> Vec<Value> {
        serde_json::from_str(&self.call(&[], "/_test/requests")).expect("requests JSON")
    }

    fn post(&self, path: &str, body: &Value) {
        let file = self.dir.path().join("body.json");
        std::fs::write(&file, body.to_string()).expect("write body");
        self.call(
            &["-X", "POST", "-H", "Content-Type: application/json", "--data-binary", &format!("@{}", file.display())],
            path,
        );
    }

    fn call(&self, args: &[&str], path: &str) -> String {
        let out = Command::new("curl")
            .args(["-sS", "--fail"])
            .args(args)
            .arg(format!("http://127.0.0.1:{}{path}", self.port))
            .output()
            .expect("run curl");
        assert!(out.status.success(), "stand-in {path}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// What a test pod is.
pub struct PodSpec<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    pub node: &'a str,
    pub labels: Value,
    pub annotations: Value,
    /// (kind, name) of the controller.
    pub owner: Option<(&'a str, &'a str)>,
    /// (container name, container id) of its running container.
    pub container: Option<(&'a str, &'a str)>,
    pub ip: &'a str,
}

/// A pod object as the API server returns it.
pub fn pod(p: &PodSpec<'_>) -> Value {
    let mut meta = json!({
        "name": p.name, "namespace": p.namespace, "uid": p.uid,
        "creationTimestamp": "2026-12-03T10:00:00Z",
        "labels": p.labels, "annotations": p.annotations,
    });
    if let Some((kind, name)) = p.owner {
        let api = if kind == "Job" { "batch/v1" } else { "apps/v1" };
        meta["ownerReferences"] = json!([{"apiVersion": api, "kind": kind, "name": name,
            "uid": format!("{}-owner", p.uid), "controller": true, "blockOwnerDeletion": true}]);
    }
    let statuses: Vec<Value> = p
        .container
        .iter()
        .map(|(name, id)| {
            json!({"name": name, "ready": true, "restartCount": 0, "image": "docker.io/library/python:3.11",
                "imageID": "docker.io/library/python@sha256:0000", "containerID": format!("containerd://{id}"),
                "started": true, "state": {"running": {"startedAt": "2026-12-03T10:00:02Z"}}})
        })
        .collect();
    let containers: Vec<Value> =
        p.container.iter().map(|(name, _)| json!({"name": name, "image": "docker.io/library/python:3.11"})).collect();
    json!({
        "kind": "Pod", "apiVersion": "v1", "metadata": meta,
        "spec": {"nodeName": p.node, "containers": containers, "restartPolicy": "Always",
                 "serviceAccountName": "default"},
        "status": {"phase": "Running", "hostIP": "10.0.0.10", "podIP": p.ip, "podIPs": [{"ip": p.ip}],
                   "qosClass": "Burstable", "containerStatuses": statuses},
    })
}

/// An owner object (ReplicaSet, Job) controlled by `parent` (kind, name).
pub fn owner_object(kind: &str, namespace: &str, name: &str, parent: Option<(&str, &str)>) -> Value {
    let api = if kind == "Job" { "batch/v1" } else { "apps/v1" };
    let mut meta = json!({"name": name, "namespace": namespace, "uid": format!("{name}-uid")});
    if let Some((pkind, pname)) = parent {
        let papi = if pkind == "CronJob" { "batch/v1" } else { "apps/v1" };
        meta["ownerReferences"] = json!([{"apiVersion": papi, "kind": pkind, "name": pname,
            "uid": format!("{pname}-uid"), "controller": true, "blockOwnerDeletion": true}]);
    }
    json!({"kind": kind, "apiVersion": api, "metadata": meta, "spec": {}})
}

/// How kubelet names a container's cgroup.
#[derive(Clone, Copy)]
pub enum Layout {
    /// cgroupfs driver, in the v1 `pids` hierarchy: `/kubepods/burstable/pod<uid>/<id>`.
    CgroupfsPids,
    /// systemd driver with containerd, in the v2 hierarchy: `/kubepods.slice/kubepods-besteffort.slice/
    /// kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope`.
    SystemdUnified,
}

/// Real cgroup directories for one container; removed (innermost first) on drop, after the
/// processes in them are gone.
pub struct ContainerCgroup {
    created: Vec<PathBuf>,
    leaf: PathBuf,
}

impl ContainerCgroup {
    pub fn create(layout: Layout, pod_uid: &str, container_id: &str) -> Self {
        let (root, parts): (&str, Vec<String>) = match layout {
            Layout::CgroupfsPids => (
                "/sys/fs/cgroup/pids",
                vec!["kubepods".into(), "burstable".into(), format!("pod{pod_uid}"), container_id.into()],
            ),
            Layout::SystemdUnified => {
                let uid_ = pod_uid.replace('-', "_");
                (
                    "/sys/fs/cgroup/unified",
                    vec![
                        "kubepods.slice".into(),
                        "kubepods-besteffort.slice".into(),
                        format!("kubepods-besteffort-pod{uid_}.slice"),
                        format!("cri-containerd-{container_id}.scope"),
                    ],
                )
            }
        };
        let mut path = PathBuf::from(root);
        let mut created = Vec::new();
        for part in parts {
            path.push(part);
            if !path.exists() {
                std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
                created.push(path.clone());
            }
        }
        Self { created, leaf: path }
    }

    /// `python3 ARGS` started inside this cgroup from its first instruction (moved before exec);
    /// returns once it accepts connections on `listen`.
    pub fn spawn_python(&self, args: &[&str], listen: std::net::SocketAddr, env: &[(&str, &str)]) -> Server {
        let procs = self.leaf.join("cgroup.procs");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(r#"echo $$ > "$0" && exec python3 "$@""#).arg(&procs).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child =
            cmd.process_group(0).stdin(Stdio::null()).stdout(Stdio::null()).spawn().expect("start python in cgroup");
        let up = crate::wait_for(std::time::Duration::from_secs(30), || {
            std::net::TcpStream::connect_timeout(&listen, std::time::Duration::from_millis(200)).ok()
        });
        assert!(up.is_some(), "nothing listens on {listen}");
        Server::from_child(child, listen.port())
    }

    pub fn path(&self) -> &Path {
        &self.leaf
    }
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            // A process that is still exiting keeps the directory busy for a moment.
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}
