//! Kubernetes metadata: the pods of this node, from the API server, for resource attributes,
//! service names, selectors and peer names. Off unless an API is configured (in-cluster service
//! account, `KUBECONFIG` or `~/.kube/config`): outside Kubernetes nothing changes.

pub mod cache;
pub mod identity;
pub mod owners;
pub mod peers;
pub mod pod;
pub mod watch;

use std::{sync::Arc, time::Duration};

pub use cache::PodCache;

use crate::stats::Stats;

/// What the operator configured (`kubernetes:` in the config file).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// `k8s.cluster.name`; the API does not tell it.
    pub cluster_name: Option<String>,
    /// This node's name: `NODE_NAME` (downward API), else the host name.
    pub node_name: String,
}

/// Where kubelet mounts a pod's service account token.
const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Whether this host has any Kubernetes API configuration, without reading it. In a pod,
/// kubelet sets `KUBERNETES_SERVICE_HOST` in every container, but the API is usable only with a
/// mounted service account token: a pod without one (`automountServiceAccountToken: false`)
/// runs without metadata, not with an error.
pub fn api_configured() -> bool {
    (std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() && std::path::Path::new(SERVICE_ACCOUNT_TOKEN).exists())
        || std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty())
        || std::env::var_os("HOME").is_some_and(|h| std::path::Path::new(&h).join(".kube/config").exists())
}

/// Connects to the API and starts watching this node's pods. `None` when no API is configured;
/// an error when one is configured but unusable (bad kubeconfig).
pub async fn start(settings: &KubernetesSettings, stats: Arc<Stats>) -> anyhow::Result<Option<Arc<PodCache>>> {
    if !api_configured() {
        return Ok(None);
    }
    let config = kube::Config::infer().await.map_err(|e| anyhow::anyhow!("kubernetes configuration: {e}"))?;
    log::info!("kubernetes: watching the pods of node {} at {}", settings.node_name, config.cluster_url);
    let client = kube::Client::try_from(config).map_err(|e| anyhow::anyhow!("kubernetes client: {e}"))?;
    let cache = Arc::new(PodCache::default());
    tokio::spawn(watch::run(client, settings.node_name.clone(), cache.clone(), stats));
    Ok(Some(cache))
}

/// How long start waits for the first list of this node's pods.
pub const FIRST_POD_LIST_WAIT: Duration = Duration::from_secs(3);

/// Waits (bounded) for the first full list of this node's pods, so processes running at start
/// are matched against it; returns whether it came.
pub async fn wait_for_first_list(cache: &PodCache) -> bool {
    let deadline = tokio::time::Instant::now() + FIRST_POD_LIST_WAIT;
    while !cache.synced() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !cache.synced() {
        log::warn!("kubernetes: no pod list after {FIRST_POD_LIST_WAIT:?}; pods are matched as they arrive");
    }
    cache.synced()
}
