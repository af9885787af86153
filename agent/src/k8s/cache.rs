//! The pods of this node, by UID and by IP, shared between the watch task (writer) and
//! discovery and the tracer (readers). Holds this node's pods only, so its size is bounded by
//! the node's pod limit, not by the cluster.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, RwLock},
};

use tokio::sync::Notify;

use super::pod::PodMeta;

#[derive(Default)]
pub struct PodCache {
    inner: RwLock<Inner>,
    changed: Notify,
}

#[derive(Default)]
struct Inner {
    pods: HashMap<String, Arc<PodMeta>>,
    by_ip: HashMap<IpAddr, String>,
    /// Whether a full list has been applied since start.
    synced: bool,
}

impl PodCache {
    pub fn get(&self, uid: &str) -> Option<Arc<PodMeta>> {
        self.read().pods.get(uid).cloned()
    }

    /// The pod that owns `ip` on this node.
    pub fn by_ip(&self, ip: IpAddr) -> Option<Arc<PodMeta>> {
        let inner = self.read();
        inner.by_ip.get(&ip).and_then(|uid| inner.pods.get(uid)).cloned()
    }

    pub fn len(&self) -> usize {
        self.read().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn synced(&self) -> bool {
        self.read().synced
    }

    /// Adds or replaces a pod. Returns whether anything a process's identity uses changed.
    pub fn upsert(&self, pod: PodMeta) -> bool {
        let mut inner = self.write();
        if inner.pods.get(&pod.uid).is_some_and(|old| **old == pod) {
            return false;
        }
        inner.unindex(&pod.uid);
        for ip in &pod.ips {
            inner.by_ip.insert(*ip, pod.uid.clone());
        }
        inner.pods.insert(pod.uid.clone(), Arc::new(pod));
        drop(inner);
        self.changed.notify_one();
        true
    }

    pub fn remove(&self, uid: &str) {
        let mut inner = self.write();
        inner.unindex(uid);
        if inner.pods.remove(uid).is_some() {
            drop(inner);
            self.changed.notify_one();
        }
    }

    /// After a full list: pods not in it were deleted while the watch was away.
    pub fn keep_only(&self, listed: &HashSet<String>) {
        let mut inner = self.write();
        let gone: Vec<String> = inner.pods.keys().filter(|uid| !listed.contains(*uid)).cloned().collect();
        for uid in &gone {
            inner.unindex(uid);
            inner.pods.remove(uid);
        }
        inner.synced = true;
        drop(inner);
        self.changed.notify_one();
    }

    /// Resolves when the cache changed since the last call returned (changes coalesce).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn unindex(&mut self, uid: &str) {
        if let Some(old) = self.pods.get(uid) {
            for ip in &old.ips {
                if self.by_ip.get(ip).is_some_and(|owner| owner == uid) {
                    self.by_ip.remove(ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, ip: &str) -> PodMeta {
        PodMeta { uid: uid.into(), name: format!("p-{uid}"), ips: vec![ip.parse().unwrap()], ..Default::default() }
    }

    #[test]
    fn ip_index_follows_pods() {
        let c = PodCache::default();
        assert!(c.upsert(pod("a", "10.0.0.1")));
        assert!(!c.upsert(pod("a", "10.0.0.1")), "an identical update changes nothing");
        assert_eq!(c.by_ip("10.0.0.1".parse().unwrap()).unwrap().uid, "a");
        // The IP moves to a new pod; the old pod's later deletion must not unindex it.
        c.upsert(pod("b", "10.0.0.1"));
        c.remove("a");
        assert_eq!(c.by_ip("10.0.0.1".parse().unwrap()).unwrap().uid, "b");
        c.keep_only(&HashSet::new());
        assert!(c.is_empty() && c.by_ip("10.0.0.1".parse().unwrap()).is_none() && c.synced());
    }
}
