//! A pod's part of a process's resource: the OpenTelemetry k8s attributes, and the
//! `service.name`/`service.namespace`/`service.version` rules the OpenTelemetry Operator uses.

use super::{KubernetesSettings, pod::PodMeta};
use crate::trace::span::AttrValue;

const ANNOTATION_PREFIX: &str = "resource.opentelemetry.io/";

/// `k8s.*` resource attributes for a process of `pod`, in `container` when known.
pub fn resource_attributes(
    pod: &PodMeta,
    container: Option<&str>,
    settings: &KubernetesSettings,
) -> Vec<(String, AttrValue)> {
    let mut attrs: Vec<(String, AttrValue)> = vec![
        ("k8s.namespace.name".into(), pod.namespace.clone().into()),
        ("k8s.pod.name".into(), pod.name.clone().into()),
        ("k8s.pod.uid".into(), pod.uid.clone().into()),
    ];
    if let Some(c) = container {
        attrs.push(("k8s.container.name".into(), c.to_owned().into()));
    }
    let node = if pod.node_name.is_empty() { &settings.node_name } else { &pod.node_name };
    attrs.push(("k8s.node.name".into(), node.clone().into()));
    for owner in &pod.owners {
        attrs.push((owner.kind.attribute().into(), owner.name.clone().into()));
    }
    if let Some(cluster) = &settings.cluster_name {
        attrs.push(("k8s.cluster.name".into(), cluster.clone().into()));
    }
    // Every `resource.opentelemetry.io/<key>` annotation is that resource attribute, as the
    // Operator does; service.* are handled by the naming rules below.
    for (key, value) in &pod.annotations {
        if let Some(attr) = key.strip_prefix(ANNOTATION_PREFIX)
            && !attr.starts_with("service.")
            && !attr.is_empty()
        {
            attrs.push((attr.to_owned(), value.clone().into()));
        }
    }
    attrs
}

/// `service.name` below the process's own `OTEL_SERVICE_NAME`: the annotation, the
/// `app.kubernetes.io/name` label, the workload's name, the pod's, then the container's.
pub fn service_name(pod: &PodMeta, container: Option<&str>) -> Option<String> {
    annotation(pod, "service.name")
        .or_else(|| label(pod, "app.kubernetes.io/name"))
        .or_else(|| pod.workload().map(|o| o.name.clone()))
        .or_else(|| (!pod.name.is_empty()).then(|| pod.name.clone()))
        .or_else(|| container.map(str::to_owned))
}

/// `service.namespace`: the annotation, else the pod's namespace.
pub fn service_namespace(pod: &PodMeta) -> Option<String> {
    annotation(pod, "service.namespace").or_else(|| (!pod.namespace.is_empty()).then(|| pod.namespace.clone()))
}

/// `service.version`: the annotation, else the `app.kubernetes.io/version` label.
pub fn service_version(pod: &PodMeta) -> Option<String> {
    annotation(pod, "service.version").or_else(|| label(pod, "app.kubernetes.io/version"))
}

fn annotation(pod: &PodMeta, attr: &str) -> Option<String> {
    pod.annotations.get(&format!("{ANNOTATION_PREFIX}{attr}")).filter(|v| !v.is_empty()).cloned()
}

fn label(pod: &PodMeta, key: &str) -> Option<String> {
    pod.labels.get(key).filter(|v| !v.is_empty()).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::pod::{Owner, OwnerKind};

    fn pod() -> PodMeta {
        PodMeta {
            uid: "u".into(),
            namespace: "shop".into(),
            name: "orders-7d9f8b6c5-x2x7k".into(),
            node_name: "node-a".into(),
            owners: vec![
                Owner { kind: OwnerKind::ReplicaSet, name: "orders-7d9f8b6c5".into() },
                Owner { kind: OwnerKind::Deployment, name: "orders".into() },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn service_name_follows_the_operator_order() {
        let mut p = pod();
        p.owners.clear();
        p.name.clear();
        assert_eq!(service_name(&p, Some("app")).as_deref(), Some("app"), "6. container");
        p.name = "orders-7d9f8b6c5-x2x7k".into();
        assert_eq!(service_name(&p, Some("app")).as_deref(), Some("orders-7d9f8b6c5-x2x7k"), "5. pod");
        p = pod();
        assert_eq!(service_name(&p, Some("app")).as_deref(), Some("orders"), "4. workload, not its ReplicaSet");
        p.labels.insert("app.kubernetes.io/name".into(), "orders-api".into());
        assert_eq!(service_name(&p, Some("app")).as_deref(), Some("orders-api"), "3. label");
        p.annotations.insert("resource.opentelemetry.io/service.name".into(), "checkout".into());
        assert_eq!(service_name(&p, Some("app")).as_deref(), Some("checkout"), "2. annotation");
    }

    #[test]
    fn namespace_version_and_attributes() {
        let mut p = pod();
        assert_eq!(service_namespace(&p).as_deref(), Some("shop"));
        assert_eq!(service_version(&p), None);
        p.labels.insert("app.kubernetes.io/version".into(), "1.2.3".into());
        p.annotations.insert("resource.opentelemetry.io/service.namespace".into(), "retail".into());
        p.annotations.insert("resource.opentelemetry.io/deployment.environment.name".into(), "prod".into());
        assert_eq!(service_namespace(&p).as_deref(), Some("retail"));
        assert_eq!(service_version(&p).as_deref(), Some("1.2.3"));
        let settings = KubernetesSettings { cluster_name: Some("eu-1".into()), node_name: "ignored".into() };
        let attrs = resource_attributes(&p, Some("app"), &settings);
        let get = |k: &str| attrs.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(get("k8s.deployment.name"), Some("orders".into()));
        assert_eq!(get("k8s.replicaset.name"), Some("orders-7d9f8b6c5".into()));
        assert_eq!(get("k8s.node.name"), Some("node-a".into()));
        assert_eq!(get("k8s.cluster.name"), Some("eu-1".into()));
        assert_eq!(get("k8s.container.name"), Some("app".into()));
        assert_eq!(get("deployment.environment.name"), Some("prod".into()));
        assert_eq!(get("service.namespace"), None, "service.* come from the naming rules");
    }
}
