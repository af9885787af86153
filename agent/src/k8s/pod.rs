//! What sonde keeps of a pod: the few fields resource attributes, service names and selectors
//! use, not the whole object (a pod's status and spec are tens of kilobytes).

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::core::v1::Pod;

/// Annotation values longer than this are not kept (`kubectl.kubernetes.io/last-applied-
/// configuration` holds a whole manifest); selectors and naming use short values.
const MAX_ANNOTATION_VALUE: usize = 1024;

/// The kinds of workload that own pods, directly or through another owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OwnerKind {
    ReplicaSet,
    Deployment,
    StatefulSet,
    DaemonSet,
    Job,
    CronJob,
}

impl OwnerKind {
    pub fn parse(kind: &str) -> Option<Self> {
        Some(match kind {
            "ReplicaSet" => Self::ReplicaSet,
            "Deployment" => Self::Deployment,
            "StatefulSet" => Self::StatefulSet,
            "DaemonSet" => Self::DaemonSet,
            "Job" => Self::Job,
            "CronJob" => Self::CronJob,
            _ => return None,
        })
    }

    /// The resource attribute that carries this owner's name.
    pub fn attribute(self) -> &'static str {
        match self {
            Self::ReplicaSet => "k8s.replicaset.name",
            Self::Deployment => "k8s.deployment.name",
            Self::StatefulSet => "k8s.statefulset.name",
            Self::DaemonSet => "k8s.daemonset.name",
            Self::Job => "k8s.job.name",
            Self::CronJob => "k8s.cronjob.name",
        }
    }

    /// The selector key that matches this owner kind's name.
    pub fn selector_key(self) -> &'static str {
        match self {
            Self::ReplicaSet => "k8s_replicaset_name",
            Self::Deployment => "k8s_deployment_name",
            Self::StatefulSet => "k8s_statefulset_name",
            Self::DaemonSet => "k8s_daemonset_name",
            Self::Job => "k8s_job_name",
            Self::CronJob => "k8s_cronjob_name",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub kind: OwnerKind,
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodMeta {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node_name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The controller chain, nearest first: `[ReplicaSet, Deployment]`, `[Job, CronJob]`,
    /// `[StatefulSet]`. Only owners the API showed; an owner that could not be read ends it.
    pub owners: Vec<Owner>,
    /// Container id (without the `containerd://` scheme) → container name.
    pub containers: Vec<(String, String)>,
    /// The pod's IPs; empty for host-network pods, whose IP is the node's and names no workload.
    pub ips: Vec<IpAddr>,
}

impl PodMeta {
    /// The pod's own fields; `owners` holds only its direct controller until resolved.
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let uid = meta.uid.clone()?;
        let annotations = meta
            .annotations
            .iter()
            .flatten()
            .filter(|(_, v)| v.len() <= MAX_ANNOTATION_VALUE)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let owners = meta
            .owner_references
            .iter()
            .flatten()
            .filter(|o| o.controller == Some(true))
            .filter_map(|o| Some(Owner { kind: OwnerKind::parse(&o.kind)?, name: o.name.clone() }))
            .take(1)
            .collect();
        let status = pod.status.as_ref();
        let statuses = status.into_iter().flat_map(|s| {
            [&s.container_statuses, &s.init_container_statuses, &s.ephemeral_container_statuses]
                .into_iter()
                .flatten()
                .flatten()
        });
        let containers = statuses
            .filter_map(|c| {
                let id = c.container_id.as_deref()?;
                // `containerd://<id>`, `cri-o://<id>`, `docker://<id>`.
                let id = id.split_once("://").map_or(id, |(_, id)| id);
                Some((id.to_owned(), c.name.clone()))
            })
            .collect();
        let mut ips: Vec<IpAddr> = status
            .into_iter()
            .flat_map(|s| s.pod_ips.iter().flatten().map(|p| p.ip.as_str()).chain(s.pod_ip.as_deref()))
            .filter_map(|ip| ip.parse().ok())
            .collect();
        ips.sort_unstable();
        ips.dedup();
        if pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false) {
            ips.clear();
        }
        Some(Self {
            uid,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            annotations,
            owners,
            containers,
            ips,
        })
    }

    pub fn container_name(&self, container_id: &str) -> Option<&str> {
        self.containers.iter().find(|(id, _)| id == container_id).map(|(_, name)| name.as_str())
    }

    pub fn owner(&self, kind: OwnerKind) -> Option<&str> {
        self.owners.iter().find(|o| o.kind == kind).map(|o| o.name.as_str())
    }

    /// The workload that runs the pod: the last owner of the chain (a Deployment, not its
    /// ReplicaSet).
    pub fn workload(&self) -> Option<&Owner> {
        self.owners.last()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod as the API server returns it (trimmed of fields sonde never reads).
    pub(crate) const POD_JSON: &str = r#"{
      "kind": "Pod", "apiVersion": "v1",
      "metadata": {
        "name": "orders-7d9f8b6c5-x2x7k", "generateName": "orders-7d9f8b6c5-", "namespace": "shop",
        "uid": "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0", "resourceVersion": "4711",
        "creationTimestamp": "2026-12-01T10:00:00Z",
        "labels": {"app.kubernetes.io/name": "orders", "pod-template-hash": "7d9f8b6c5"},
        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "LONG", "team": "checkout"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "orders-7d9f8b6c5",
          "uid": "11111111-2222-3333-4444-555555555555", "controller": true, "blockOwnerDeletion": true}]
      },
      "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "orders:1.2"}]},
      "status": {
        "phase": "Running", "podIP": "10.244.1.7", "podIPs": [{"ip": "10.244.1.7"}, {"ip": "fd00::7"}],
        "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "orders:1.2",
          "imageID": "sha256:ab", "containerID": "containerd://7b5f8a3c1d2e4f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8",
          "state": {"running": {"startedAt": "2026-12-01T10:00:02Z"}}}]
      }
    }"#;

    #[test]
    fn keeps_what_naming_and_selectors_use() {
        let long = "x".repeat(MAX_ANNOTATION_VALUE + 1);
        let pod: Pod = serde_json::from_str(&POD_JSON.replace("LONG", &long)).unwrap();
        let p = PodMeta::from_pod(&pod).unwrap();
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str(), p.node_name.as_str()),
            ("shop", "orders-7d9f8b6c5-x2x7k", "node-a")
        );
        assert_eq!(p.owners, vec![Owner { kind: OwnerKind::ReplicaSet, name: "orders-7d9f8b6c5".into() }]);
        assert_eq!(p.container_name("7b5f8a3c1d2e4f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8"), Some("app"));
        assert_eq!(p.ips.len(), 2);
        assert_eq!(p.annotations.keys().collect::<Vec<_>>(), vec!["team"], "the long annotation is not kept");
        assert_eq!(p.labels["app.kubernetes.io/name"], "orders");
    }
}
