//! Selectors: which processes to trace, and under which service name.

use globset::{Glob, GlobMatcher};

use crate::k8s::pod::{OwnerKind, PodMeta};

/// A set of TCP ports, parsed from `8080,9000-9100`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSet(Vec<(u16, u16)>);

impl std::fmt::Display for PortSet {
    /// The same `8080,9000-9100` form it was parsed from.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> =
            self.0.iter().map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
        f.write_str(&parts.join(","))
    }
}

impl PortSet {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, part),
            };
            let parse = |s: &str| {
                s.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                    format!("{s:?} in {text:?} is not a port (1-65535); write ports like 8080,9000-9100")
                })
            };
            let (lo, hi) = (parse(lo)?, parse(hi)?);
            if lo > hi {
                return Err(format!("range {part:?} is backwards; write it low-high, e.g. {hi}-{lo}"));
            }
            ranges.push((lo, hi));
        }
        if ranges.is_empty() {
            return Err(format!("{text:?} lists no ports; write ports like 8080,9000-9100"));
        }
        Ok(Self(ranges))
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|(lo, hi)| (*lo..=*hi).contains(&port))
    }
}

/// One selector: all criteria it sets must match (AND). Selectors are tried in order.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    pub service_name: Option<String>,
    pub open_ports: Option<PortSet>,
    pub exe_path: Option<GlobMatcher>,
    pub pids: Vec<u32>,
    pub k8s: PodCriteria,
}

/// Criteria on the pod and container a process runs in (globs; all set ones must match). A
/// process with no known pod matches none of them.
#[derive(Clone, Debug, Default)]
pub struct PodCriteria {
    pub namespace: Option<GlobMatcher>,
    pub pod_name: Option<GlobMatcher>,
    pub owners: Vec<(OwnerKind, GlobMatcher)>,
    /// Any owner of the chain (ReplicaSet, Deployment, ...).
    pub owner_name: Option<GlobMatcher>,
    pub container_name: Option<GlobMatcher>,
    pub pod_labels: Vec<(String, GlobMatcher)>,
    pub pod_annotations: Vec<(String, GlobMatcher)>,
}

impl PodCriteria {
    pub fn is_empty(&self) -> bool {
        self.namespace.is_none()
            && self.pod_name.is_none()
            && self.owners.is_empty()
            && self.owner_name.is_none()
            && self.container_name.is_none()
            && self.pod_labels.is_empty()
            && self.pod_annotations.is_empty()
    }

    fn matches(&self, pod: Option<&PodMeta>, container: Option<&str>) -> bool {
        let Some(pod) = pod else { return self.is_empty() };
        let glob = |g: &Option<GlobMatcher>, value: Option<&str>| {
            g.as_ref().is_none_or(|g| value.is_some_and(|v| g.is_match(v)))
        };
        let map = |want: &[(String, GlobMatcher)], have: &std::collections::BTreeMap<String, String>| {
            want.iter().all(|(k, g)| have.get(k).is_some_and(|v| g.is_match(v)))
        };
        glob(&self.namespace, Some(&pod.namespace))
            && glob(&self.pod_name, Some(&pod.name))
            && self.owners.iter().all(|(kind, g)| pod.owner(*kind).is_some_and(|n| g.is_match(n)))
            && self.owner_name.as_ref().is_none_or(|g| pod.owners.iter().any(|o| g.is_match(&o.name)))
            && glob(&self.container_name, container)
            && map(&self.pod_labels, &pod.labels)
            && map(&self.pod_annotations, &pod.annotations)
    }
}

/// What a selector looks at.
pub struct ProcessFacts<'a> {
    pub pid: u32,
    pub exe_path: &'a str,
    pub listen_ports: &'a [u16],
    /// The pod the process runs in, when the Kubernetes cache knows it.
    pub pod: Option<&'a PodMeta>,
    pub container_name: Option<&'a str>,
}

pub fn compile_glob(pattern: &str) -> Result<GlobMatcher, String> {
    Glob::new(pattern)
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("{pattern:?} is not a valid glob ({e}); use patterns like /usr/sbin/nginx or */python3*"))
}

impl std::fmt::Display for Selector {
    /// `service.name=web open_ports=8080 k8s_namespace=shop ...`, as configured.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(name) = &self.service_name {
            parts.push(format!("service.name={name}"));
        }
        if let Some(ports) = &self.open_ports {
            parts.push(format!("open_ports={ports}"));
        }
        if let Some(glob) = &self.exe_path {
            parts.push(format!("exe_path={}", glob.glob()));
        }
        if !self.pids.is_empty() {
            parts.push(format!("pid={:?}", self.pids));
        }
        let k = &self.k8s;
        for (key, glob) in [
            ("k8s_namespace", &k.namespace),
            ("k8s_pod_name", &k.pod_name),
            ("k8s_owner_name", &k.owner_name),
            ("container_name", &k.container_name),
        ] {
            if let Some(g) = glob {
                parts.push(format!("{key}={}", g.glob()));
            }
        }
        for (kind, g) in &k.owners {
            parts.push(format!("{}={}", kind.selector_key(), g.glob()));
        }
        for (key, list) in [("k8s_pod_labels", &k.pod_labels), ("k8s_pod_annotations", &k.pod_annotations)] {
            for (name, g) in list {
                parts.push(format!("{key}.{name}={}", g.glob()));
            }
        }
        f.write_str(&parts.join(" "))
    }
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.open_ports.is_none() && self.exe_path.is_none() && self.pids.is_empty() && self.k8s.is_empty()
    }

    /// A selector that matches every process of one namespace (the default excludes).
    pub fn namespace(name: &str) -> Self {
        Self {
            service_name: None,
            open_ports: None,
            exe_path: None,
            pids: vec![],
            k8s: PodCriteria { namespace: compile_glob(name).ok(), ..Default::default() },
        }
    }

    /// Whether this selector names `namespace` literally (not by a wildcard).
    pub fn names_namespace(&self, namespace: &str) -> bool {
        self.k8s.namespace.as_ref().is_some_and(|g| g.glob().glob() == namespace)
    }

    /// Whether matching needs the process's pod.
    pub fn needs_pod(&self) -> bool {
        !self.k8s.is_empty()
    }

    pub fn matches(&self, p: &ProcessFacts<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        if !self.pids.is_empty() && !self.pids.contains(&p.pid) {
            return false;
        }
        if let Some(glob) = &self.exe_path
            && !glob.is_match(p.exe_path)
        {
            return false;
        }
        if let Some(ports) = &self.open_ports
            && !p.listen_ports.iter().any(|port| ports.contains(*port))
        {
            return false;
        }
        self.k8s.matches(p.pod, p.container_name)
    }

    /// Whether this selector needs the process's listening ports (they cost a /proc scan).
    pub fn needs_ports(&self) -> bool {
        self.open_ports.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_sets() {
        let p = PortSet::parse("8080, 9000-9100").unwrap();
        assert!(p.contains(8080) && p.contains(9050) && !p.contains(9101));
        assert!(PortSet::parse("9100-9000").unwrap_err().contains("backwards"));
        assert!(PortSet::parse("http").unwrap_err().contains("not a port"));
        assert!(PortSet::parse("70000").is_err());
        assert!(PortSet::parse("").is_err());
    }

    #[test]
    fn all_criteria_must_match() {
        let s = Selector {
            service_name: None,
            open_ports: Some(PortSet::parse("8080").unwrap()),
            exe_path: Some(compile_glob("*/python3*").unwrap()),
            pids: vec![],
            k8s: PodCriteria::default(),
        };
        let facts = |exe, ports: &'static [u16]| ProcessFacts {
            pid: 1,
            exe_path: exe,
            listen_ports: ports,
            pod: None,
            container_name: None,
        };
        assert!(s.matches(&facts("/usr/bin/python3.11", &[8080])));
        assert!(!s.matches(&facts("/usr/bin/python3.11", &[8081])));
        assert!(!s.matches(&facts("/usr/sbin/nginx", &[8080])));
        assert!(compile_glob("[").is_err());
    }

    #[test]
    fn pod_criteria() {
        use crate::k8s::pod::Owner;
        let pod = PodMeta {
            namespace: "shop".into(),
            name: "orders-7d9f8b6c5-x2x7k".into(),
            labels: [("tier".to_string(), "backend".to_string())].into(),
            owners: vec![
                Owner { kind: OwnerKind::ReplicaSet, name: "orders-7d9f8b6c5".into() },
                Owner { kind: OwnerKind::Deployment, name: "orders".into() },
            ],
            ..Default::default()
        };
        let g = |p: &str| compile_glob(p).unwrap();
        let sel =
            |k8s: PodCriteria| Selector { service_name: None, open_ports: None, exe_path: None, pids: vec![], k8s };
        let facts = |pod: Option<&'static PodMeta>, container| ProcessFacts {
            pid: 1,
            exe_path: "/usr/bin/python3",
            listen_ports: &[],
            pod,
            container_name: container,
        };
        let pod: &'static PodMeta = Box::leak(Box::new(pod));
        let ns = sel(PodCriteria { namespace: Some(g("shop")), ..Default::default() });
        assert!(ns.matches(&facts(Some(pod), None)));
        assert!(!ns.matches(&facts(None, None)), "no pod, no match");
        assert!(
            !sel(PodCriteria { namespace: Some(g("kube-*")), ..Default::default() }).matches(&facts(Some(pod), None))
        );
        let deploy = sel(PodCriteria { owners: vec![(OwnerKind::Deployment, g("ord*"))], ..Default::default() });
        assert!(deploy.matches(&facts(Some(pod), None)));
        let sts = sel(PodCriteria { owners: vec![(OwnerKind::StatefulSet, g("*"))], ..Default::default() });
        assert!(!sts.matches(&facts(Some(pod), None)));
        let owner = sel(PodCriteria { owner_name: Some(g("orders-7d9f8b6c5")), ..Default::default() });
        assert!(owner.matches(&facts(Some(pod), None)));
        let labels = |v: &str| sel(PodCriteria { pod_labels: vec![("tier".into(), g(v))], ..Default::default() });
        assert!(labels("back*").matches(&facts(Some(pod), None)));
        assert!(!labels("front*").matches(&facts(Some(pod), None)));
        let container = sel(PodCriteria { container_name: Some(g("app")), ..Default::default() });
        assert!(container.matches(&facts(Some(pod), Some("app"))));
        assert!(!container.matches(&facts(Some(pod), None)), "an unknown container is not matched");
        assert!(
            sel(PodCriteria { namespace: Some(g("kube-system")), ..Default::default() }).names_namespace("kube-system")
        );
        assert!(!sel(PodCriteria { namespace: Some(g("*")), ..Default::default() }).names_namespace("kube-system"));
    }
}
