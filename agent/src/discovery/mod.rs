//! Discovery: turns selectors into traced processes, gives each its resource, and finds the
//! sockets they already had open so those connections are traced too.

pub mod container;
pub mod procfs;
pub mod selector;
pub mod service_name;
pub mod tls;

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use selector::{ProcessFacts, Selector};

use crate::{
    conn::Role,
    k8s::{KubernetesSettings, PodCache, identity, pod::PodMeta},
    trace::{
        resource::{ProcessIdentity, Resource},
        span::AttrValue,
    },
};

/// Listening TCP sockets (inode -> port) per network namespace, read at most once per scan.
#[derive(Default)]
struct ListenerCache {
    by_namespace: HashMap<String, HashMap<u64, u16>>,
}

impl ListenerCache {
    fn of(&mut self, pid: u32) -> &HashMap<u64, u16> {
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("pid {pid}"));
        self.by_namespace.entry(ns).or_insert_with(|| procfs::listening_ports(pid))
    }
}

/// A socket a newly traced process already had open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeededSocket {
    pub fd: u32,
    pub role: Role,
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// What the caller must do in the kernel and the pipeline.
#[derive(Debug)]
pub enum Action {
    /// Trace `pid` (add it to the PID filter) and track these existing sockets.
    Trace { pid: u32, resource: Arc<Resource>, sockets: Vec<SeededSocket>, origin: Origin },
    /// A child the kernel already traces (fork hook): record its resource and inherited sockets.
    Adopt { pid: u32, resource: Arc<Resource>, sockets: Vec<SeededSocket> },
    /// A traced process exec'd a new image: same service, new executable.
    Refresh { pid: u32, resource: Arc<Resource> },
}

/// Why a process is traced, as far as it matters for how its TLS library is probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Selected on its own, and listening on a TCP port: a server.
    Listener,
    /// Selected on its own, not listening: a client, a shell, a job runner; it may start
    /// children that use TLS at once.
    Other,
    /// A descendant of a traced process, found running when sonde started.
    Descendant,
}

pub struct Discovery {
    selectors: Vec<Selector>,
    /// A process any of these match is never traced (checked before the selectors).
    excludes: Vec<Selector>,
    extra_resource: Vec<(String, String)>,
    default_service: Option<String>,
    host_name: String,
    self_pid: u32,
    traced: HashMap<u32, Arc<Resource>>,
    /// Names a traced process got from its selector or its own OTEL_SERVICE_NAME: metadata
    /// that arrives later never renames it.
    explicit_names: HashMap<u32, String>,
    pods: Option<Arc<PodCache>>,
    k8s: KubernetesSettings,
}

/// Where a process runs: its container and, when the Kubernetes cache knows it, its pod.
struct Placement {
    container: container::ContainerIdentity,
    pod: Option<Arc<PodMeta>>,
}

impl Placement {
    fn container_name(&self) -> Option<&str> {
        let id = self.container.container_id.as_deref()?;
        self.pod.as_deref()?.container_name(id)
    }
}

impl Discovery {
    /// `default_service` is OTEL_SERVICE_NAME from sonde's own environment (below a selector's name).
    pub fn new(
        selectors: Vec<Selector>,
        excludes: Vec<Selector>,
        extra_resource: Vec<(String, String)>,
        default_service: Option<String>,
    ) -> Self {
        Self {
            selectors,
            excludes,
            extra_resource,
            default_service,
            host_name: procfs::host_name(),
            self_pid: std::process::id(),
            traced: HashMap::new(),
            explicit_names: HashMap::new(),
            pods: None,
            k8s: KubernetesSettings::default(),
        }
    }

    /// Pod metadata for resources, names and selectors, from this node's pod cache.
    pub fn with_kubernetes(mut self, pods: Option<Arc<PodCache>>, settings: KubernetesSettings) -> Self {
        self.pods = pods;
        self.k8s = settings;
        self
    }

    /// The pod cache changed: traced processes get their new identity, and processes whose pod
    /// just became known are checked against the selectors again.
    pub fn on_pods_changed(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        let pids: Vec<u32> = self.traced.keys().copied().collect();
        for pid in pids {
            let Some(old) = self.traced.get(&pid).cloned() else { continue };
            let Some(exe) = exe_of(&old) else { continue };
            let placement = self.placement(pid);
            let service = match self.explicit_names.get(&pid) {
                Some(name) => name.clone(),
                None => self.derived_name(pid, &exe, &placement),
            };
            let resource = Arc::new(self.resource_for(pid, &service, &exe, &placement));
            if *resource != *old {
                self.traced.insert(pid, resource.clone());
                actions.push(Action::Refresh { pid, resource });
            }
        }
        actions.extend(self.scan_all());
        actions
    }

    /// What a process's cgroup and the pod cache say about where it runs.
    fn placement(&self, pid: u32) -> Placement {
        let container = container::of_pid(pid);
        let pod = container.pod_uid.as_deref().zip(self.pods.as_ref()).and_then(|(uid, cache)| cache.get(uid));
        Placement { container, pod }
    }

    /// A name from what sonde knows (no selector or process name): the pod's rules, sonde's own
    /// OTEL_SERVICE_NAME, the runtime's command line, the executable.
    fn derived_name(&self, pid: u32, exe: &str, placement: &Placement) -> String {
        let exe_name = exe.rsplit('/').next().unwrap_or(exe);
        placement
            .pod
            .as_deref()
            .and_then(|pod| identity::service_name(pod, placement.container_name()))
            .or_else(|| self.default_service.clone())
            .or_else(|| service_name::for_runtime(pid, exe_name))
            .unwrap_or_else(|| exe_name.to_owned())
    }

    pub fn traced_count(&self) -> usize {
        self.traced.len()
    }

    /// The processes the selectors match now (with their descendants) and the resource each
    /// would get, without tracing them.
    pub fn selected(mut self) -> Vec<(u32, Arc<Resource>)> {
        let mut selected: Vec<(u32, Arc<Resource>)> = self
            .scan_all()
            .into_iter()
            .map(|a| match a {
                Action::Trace { pid, resource, .. }
                | Action::Adopt { pid, resource, .. }
                | Action::Refresh { pid, resource } => (pid, resource),
            })
            .collect();
        selected.sort_unstable_by_key(|(pid, _)| *pid);
        selected
    }

    pub fn traced_pids(&self) -> Vec<u32> {
        self.traced.keys().copied().collect()
    }

    pub fn resource(&self, pid: u32) -> Option<&Arc<Resource>> {
        self.traced.get(&pid)
    }

    /// Every process on the host, and children of traced ones.
    pub fn scan_all(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        let pids = procfs::list_pids();
        // One read of each network namespace's socket table per scan, not one per process: with
        // many connections in TIME_WAIT the table is megabytes long.
        let mut listeners = ListenerCache::default();
        for &pid in &pids {
            if let Some(a) = self.check_pid_with(pid, &mut listeners) {
                actions.push(a);
            }
        }
        // Descendants of traced processes (forked before sonde started, e.g. PostgreSQL backends).
        let parents: HashMap<u32, u32> =
            pids.iter().filter_map(|&p| procfs::parent_and_tgid(p).map(|(ppid, _)| (p, ppid))).collect();
        for &pid in &pids {
            if self.traced.contains_key(&pid) || pid == self.self_pid {
                continue;
            }
            let mut cur = pid;
            for _ in 0..64 {
                let Some(&ppid) = parents.get(&cur) else {
                    break;
                };
                if let Some(res) = self.traced.get(&ppid).cloned() {
                    actions.push(self.trace_inherited(pid, &res));
                    break;
                }
                cur = ppid;
            }
        }
        actions
    }

    /// Re-checks one process against the selectors (after exec or listen).
    pub fn check_pid(&mut self, pid: u32) -> Option<Action> {
        self.check_pid_with(pid, &mut ListenerCache::default())
    }

    fn check_pid_with(&mut self, pid: u32, listeners: &mut ListenerCache) -> Option<Action> {
        if pid == self.self_pid || self.traced.contains_key(&pid) {
            return None;
        }
        let exe = procfs::exe_path(pid)?;
        let needs_ports = self.selectors.iter().any(Selector::needs_ports);
        let fds = if needs_ports { procfs::socket_fds(pid) } else { Vec::new() };
        // Only processes with sockets can listen: the others cost no socket table read.
        let listen_ports: Vec<u16> = if fds.is_empty() {
            Vec::new()
        } else {
            let table = listeners.of(pid);
            fds.iter().filter_map(|(_, inode)| table.get(inode).copied()).collect()
        };
        let placement = self.placement(pid);
        let facts = ProcessFacts {
            pid,
            exe_path: &exe,
            listen_ports: &listen_ports,
            pod: placement.pod.as_deref(),
            container_name: placement.container_name(),
        };
        if self.excludes.iter().any(|s| s.matches(&facts)) {
            return None;
        }
        let selector = self.selectors.iter().find(|s| s.matches(&facts))?;
        let explicit = selector.service_name.clone().or_else(|| procfs::environ_var(pid, "OTEL_SERVICE_NAME"));
        let service = explicit.clone().unwrap_or_else(|| self.derived_name(pid, &exe, &placement));
        let resource = Arc::new(self.resource_for(pid, &service, &exe, &placement));
        self.traced.insert(pid, resource.clone());
        if let Some(name) = explicit {
            self.explicit_names.insert(pid, name);
        }
        let listening = if needs_ports {
            !listen_ports.is_empty()
        } else {
            // Selected without looking at ports: look now, for this process only.
            let table = listeners.of(pid);
            procfs::socket_fds(pid).iter().any(|(_, inode)| table.contains_key(inode))
        };
        let origin = if listening { Origin::Listener } else { Origin::Other };
        Some(Action::Trace { pid, resource, sockets: seed_sockets(pid), origin })
    }

    /// The kernel traced a child of a traced process from its first syscall: give it the
    /// parent's service (threads are ignored: they share their process's resource).
    pub fn on_fork(&mut self, parent: u32, child: u32) -> Option<Action> {
        if self.traced.contains_key(&child) {
            return None;
        }
        let Some(parent_res) = self.traced.get(&parent).cloned() else {
            log::debug!("fork {parent} -> {child}: parent is not a traced process");
            return None;
        };
        // A live thread shows a different tgid. A child that already exited (a one-shot client
        // faster than sonde) still gets its parent's identity: its events are already queued.
        if let Some((_, tgid)) = procfs::parent_and_tgid(child)
            && tgid != child
        {
            return None;
        }
        let exe = procfs::exe_path(child).or_else(|| exe_of(&parent_res)).unwrap_or_default();
        let placement = self.placement(child);
        let resource = Arc::new(self.resource_for(child, &parent_res.service_name, &exe, &placement));
        self.traced.insert(child, resource.clone());
        self.inherit_name(parent, child);
        // No /proc seeding: the kernel hands the child exactly the sockets open at fork time,
        // with their true role.
        Some(Action::Adopt { pid: child, resource, sockets: Vec::new() })
    }

    /// A process called exec: a traced one keeps its service under its new executable; an
    /// untraced one is checked against the selectors.
    pub fn on_exec(&mut self, pid: u32) -> Option<Action> {
        let Some(old) = self.traced.get(&pid).cloned() else { return self.check_pid(pid) };
        let exe = procfs::exe_path(pid)?;
        let placement = self.placement(pid);
        let resource = Arc::new(self.resource_for(pid, &old.service_name, &exe, &placement));
        self.traced.insert(pid, resource.clone());
        Some(Action::Refresh { pid, resource })
    }

    pub fn on_exit(&mut self, pid: u32) {
        self.traced.remove(&pid);
        self.explicit_names.remove(&pid);
    }

    /// A child keeps its parent's service name, however it was given.
    fn inherit_name(&mut self, parent: u32, child: u32) {
        let name = self.traced.get(&parent).map(|r| r.service_name.clone());
        if let Some(name) = name {
            self.explicit_names.insert(child, name);
        }
    }

    /// Processes that vanished without an exit event (e.g. events lost).
    pub fn prune_dead(&mut self) -> Vec<u32> {
        let dead: Vec<u32> =
            self.traced.keys().copied().filter(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()).collect();
        for p in &dead {
            self.traced.remove(p);
            self.explicit_names.remove(p);
        }
        dead
    }

    fn trace_inherited(&mut self, pid: u32, parent: &Arc<Resource>) -> Action {
        let exe = procfs::exe_path(pid).unwrap_or_default();
        let placement = self.placement(pid);
        let resource = Arc::new(self.resource_for(pid, &parent.service_name, &exe, &placement));
        self.traced.insert(pid, resource.clone());
        self.explicit_names.insert(pid, parent.service_name.clone());
        Action::Trace { pid, resource, sockets: seed_sockets(pid), origin: Origin::Descendant }
    }

    fn resource_for(&self, pid: u32, service: &str, exe: &str, placement: &Placement) -> Resource {
        let mut platform: Vec<(String, AttrValue)> = Vec::new();
        if let Some(pod) = placement.pod.as_deref() {
            platform.extend(identity::service_namespace(pod).map(|ns| ("service.namespace".to_owned(), ns.into())));
            platform.extend(identity::service_version(pod).map(|v| ("service.version".to_owned(), v.into())));
        }
        if let Some(id) = &placement.container.container_id {
            platform.push(("container.id".into(), id.clone().into()));
        }
        if let Some(runtime) = placement.container.runtime {
            platform.push(("container.runtime.name".into(), runtime.into()));
        }
        match placement.pod.as_deref() {
            Some(pod) => platform.extend(identity::resource_attributes(pod, placement.container_name(), &self.k8s)),
            // The cgroup names the pod even when the API does not (or is not configured).
            None => {
                platform.extend(placement.container.pod_uid.clone().map(|uid| ("k8s.pod.uid".to_owned(), uid.into())))
            }
        }
        let identity = ProcessIdentity {
            pid,
            service_name: service.to_owned(),
            exe_path: exe.to_owned(),
            host_name: self.host_name.clone(),
            start_ticks: procfs::start_ticks(pid),
            platform,
        };
        Resource::for_process(&identity, &self.extra_resource)
    }
}

fn exe_of(r: &Resource) -> Option<String> {
    r.attributes.iter().find(|(k, _)| k == "process.executable.path").and_then(|(_, v)| match v {
        crate::trace::span::AttrValue::Str(s) => Some(s.to_string()),
        _ => None,
    })
}

/// Established TCP sockets the process holds. The process is the server on a socket whose local
/// port is a listening port in its network namespace (whoever owns the listener: PostgreSQL
/// backends and pre-forked workers serve on ports their parent listens on).
pub fn seed_sockets(pid: u32) -> Vec<SeededSocket> {
    let table = procfs::tcp_table(pid);
    let listening: std::collections::HashSet<u16> =
        table.values().filter(|e| e.state == procfs::TCP_LISTEN).map(|e| e.local.port()).collect();
    procfs::socket_fds(pid)
        .iter()
        .filter_map(|(fd, inode)| {
            let e = table.get(inode)?;
            (e.state == procfs::TCP_ESTABLISHED).then(|| SeededSocket {
                fd: *fd,
                role: if listening.contains(&e.local.port()) { Role::Server } else { Role::Client },
                local: e.local,
                peer: e.remote,
            })
        })
        .collect()
}

/// Local and remote address of one socket fd, from /proc.
pub fn socket_addrs(pid: u32, fd: u32) -> Option<(SocketAddr, SocketAddr)> {
    let inode = procfs::socket_inode(pid, fd)?;
    procfs::tcp_table(pid).get(&inode).map(|e| (e.local, e.remote))
}
