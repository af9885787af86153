//! The workload behind a pod's controller: a ReplicaSet's Deployment, a Job's CronJob. Read from
//! the API (metadata only) and cached; a name is never inferred from another name's shape.

use std::collections::HashMap;

use k8s_openapi::api::{apps::v1::ReplicaSet, batch::v1::Job};
use kube::{Api, Client, api::PartialObjectMeta};

use super::pod::{Owner, OwnerKind};

/// Owners are few per node (one per workload); the bound only guards against churn.
const MAX_CACHED: usize = 4096;

pub struct Owners {
    client: Client,
    /// (namespace, kind, name) → that owner's own controller, when it has one.
    parents: HashMap<(String, OwnerKind, String), Option<Owner>>,
}

/// An owner lookup the API refused or could not answer; the chain stops there.
#[derive(Debug)]
pub struct LookupFailed(pub kube::Error);

impl Owners {
    pub fn new(client: Client) -> Self {
        Self { client, parents: HashMap::new() }
    }

    /// The chain from `direct` up, nearest first: `[ReplicaSet, Deployment]`. On a failed
    /// lookup, the chain known so far and the error.
    pub async fn chain(&mut self, namespace: &str, direct: Owner) -> (Vec<Owner>, Option<LookupFailed>) {
        let mut chain = vec![direct];
        let current = chain[0].clone();
        if !matches!(current.kind, OwnerKind::ReplicaSet | OwnerKind::Job) {
            return (chain, None);
        }
        let key = (namespace.to_owned(), current.kind, current.name.clone());
        let parent = match self.parents.get(&key) {
            Some(p) => p.clone(),
            None => match self.fetch(namespace, &current).await {
                Ok(p) => {
                    if self.parents.len() >= MAX_CACHED {
                        self.parents.clear();
                    }
                    self.parents.insert(key, p.clone());
                    p
                }
                Err(e) => return (chain, Some(LookupFailed(e))),
            },
        };
        chain.extend(parent);
        (chain, None)
    }

    async fn fetch(&self, namespace: &str, owner: &Owner) -> Result<Option<Owner>, kube::Error> {
        let refs = match owner.kind {
            OwnerKind::ReplicaSet => {
                let meta: PartialObjectMeta<ReplicaSet> =
                    Api::namespaced(self.client.clone(), namespace).get_metadata(&owner.name).await?;
                meta.metadata.owner_references
            }
            OwnerKind::Job => {
                let meta: PartialObjectMeta<Job> =
                    Api::namespaced(self.client.clone(), namespace).get_metadata(&owner.name).await?;
                meta.metadata.owner_references
            }
            _ => None,
        };
        let want = match owner.kind {
            OwnerKind::ReplicaSet => OwnerKind::Deployment,
            _ => OwnerKind::CronJob,
        };
        Ok(refs
            .into_iter()
            .flatten()
            .filter(|r| r.controller == Some(true))
            .find_map(|r| (OwnerKind::parse(&r.kind) == Some(want)).then_some(Owner { kind: want, name: r.name })))
    }
}
