//! The watch of this node's pods. kube-runtime's watcher lists, then watches from the list's
//! resourceVersion with bookmarks; on `410 Gone` it lists again, and on errors it reconnects
//! with exponential backoff. Every error is counted; the cache keeps serving what it holds.

use std::{collections::HashSet, sync::Arc};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};

use super::{cache::PodCache, owners::Owners, pod::PodMeta};
use crate::stats::Stats;

pub async fn run(client: Client, node_name: String, cache: Arc<PodCache>, stats: Arc<Stats>) {
    let pods: Api<Pod> = Api::all(client.clone());
    // Only this node's pods travel: the API server filters, so cluster size costs nothing here.
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    let mut owners = Owners::new(client);
    let mut events = std::pin::pin!(watcher(pods, config).default_backoff());
    let mut listing: Option<HashSet<String>> = None;
    let mut lists = 0u64;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => {
                lists += 1;
                if lists > 1 {
                    Stats::add(&stats.k8s_relists, 1);
                }
                listing = Some(HashSet::new());
            }
            Ok(watcher::Event::InitApply(pod)) => {
                if let Some(uid) = apply(&pod, &cache, &mut owners, &stats).await
                    && let Some(seen) = &mut listing
                {
                    seen.insert(uid);
                }
            }
            Ok(watcher::Event::InitDone) => {
                cache.keep_only(&listing.take().unwrap_or_default());
                log::info!("kubernetes: {} pods on node {node_name}", cache.len());
            }
            Ok(watcher::Event::Apply(pod)) => {
                apply(&pod, &cache, &mut owners, &stats).await;
            }
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(uid) = &pod.metadata.uid {
                    cache.remove(uid);
                }
            }
            Err(e) => {
                let n = stats.k8s_api_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // The first error, then one in a hundred: an API down for an hour is one story.
                if n.is_multiple_of(100) {
                    log::warn!("kubernetes: pod watch: {e}; tracing goes on with {} cached pods", cache.len());
                }
            }
        }
        stats.k8s_pods_cached.store(cache.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Caches one pod with its owner chain; returns its UID.
async fn apply(pod: &Pod, cache: &PodCache, owners: &mut Owners, stats: &Stats) -> Option<String> {
    let mut meta = PodMeta::from_pod(pod)?;
    if let Some(direct) = meta.owners.first().cloned() {
        let (chain, failed) = owners.chain(&meta.namespace, direct).await;
        if let Some(e) = failed {
            let n = stats.k8s_api_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_multiple_of(100) {
                log::warn!("kubernetes: owner of pod {}/{}: {}", meta.namespace, meta.name, e.0);
            }
        }
        meta.owners = chain;
    }
    let uid = meta.uid.clone();
    cache.upsert(meta);
    Some(uid)
}
