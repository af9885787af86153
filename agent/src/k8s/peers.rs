//! Peer names for the service graph: a client span whose `server.address` is the IP of a pod
//! on this node names that pod's service instead. Only pod IPs are known (Services are not
//! watched), and only this node's pods: any other address stays as it was.

use std::net::IpAddr;

use super::{PodCache, identity};
use crate::trace::span::{Attr, AttrValue};

/// Rewrites `server.address` when it is a known pod's IP. Returns whether it did.
pub fn name_server_address(attrs: &mut [Attr], pods: &PodCache) -> bool {
    let Some(attr) = attrs.iter_mut().find(|a| a.key == "server.address") else { return false };
    let AttrValue::Str(text) = &attr.value else { return false };
    let Ok(ip) = text.parse::<IpAddr>() else { return false };
    let Some(name) = pods.by_ip(ip).and_then(|pod| identity::service_name(&pod, None)) else { return false };
    attr.value = AttrValue::Str(name.into());
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::pod::PodMeta;

    #[test]
    fn only_known_pod_ips_are_renamed() {
        let pods = PodCache::default();
        pods.upsert(PodMeta {
            uid: "u".into(),
            name: "payments-0".into(),
            labels: [("app.kubernetes.io/name".to_string(), "payments".to_string())].into(),
            ips: vec!["10.244.1.7".parse().unwrap()],
            ..Default::default()
        });
        let mut attrs = vec![Attr::new("server.address", "10.244.1.7"), Attr::new("server.port", 80)];
        assert!(name_server_address(&mut attrs, &pods));
        assert_eq!(attrs[0].value, AttrValue::from("payments"));
        for other in ["10.244.1.8", "api.example.com"] {
            let mut attrs = vec![Attr::new("server.address", other)];
            assert!(!name_server_address(&mut attrs, &pods));
            assert_eq!(attrs[0].value, AttrValue::from(other));
        }
    }
}
