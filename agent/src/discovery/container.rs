//! Container identity from `/proc/PID/cgroup`: the container id, the runtime that made it, and
//! the Kubernetes pod it belongs to, read from the cgroup path the runtime and kubelet chose. No
//! API is asked: the path is the evidence, and a path that matches no known layout gives nothing.
//!
//! Layouts understood (cgroup v1 lines and the v2 `0::` line alike):
//! - systemd driver: `…/cri-containerd-<id>.scope` (containerd), `…/crio-<id>.scope` (CRI-O),
//!   `…/docker-<id>.scope` (Docker, also under cri-dockerd), `…/libpod-<id>.scope` (podman);
//! - cgroupfs driver: `/kubepods/<qos>/pod<uid>/<id>`, `/kubepods/…/crio-<id>`, `/docker/<id>`,
//!   `/libpod_parent/libpod-<id>`;
//! - kubelet's pod level: `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_with_underscores>.slice`.
//!
//! A container id is 64 lowercase hex digits; shorter hex names (other sandboxes' cgroups) are not
//! containers. Conmon's own scopes (`crio-conmon-…`, `libpod-conmon-…`) are not the container.

/// What a process's cgroup path says about its container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerIdentity {
    pub container_id: Option<String>,
    /// `container.runtime.name`, where the path names it.
    pub runtime: Option<&'static str>,
    /// The Kubernetes pod UID, dashed (`0b1c…-…`).
    pub pod_uid: Option<String>,
}

impl ContainerIdentity {
    pub fn is_empty(&self) -> bool {
        self.container_id.is_none() && self.pod_uid.is_none()
    }
}

/// The identity of a running process; empty when it is in no container (or has exited).
pub fn of_pid(pid: u32) -> ContainerIdentity {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map(|text| parse(&text)).unwrap_or_default()
}

/// Parses the text of a `/proc/PID/cgroup` file. The first line whose path names a container or
/// a pod wins; every hierarchy of one process shows the same container.
pub fn parse(cgroup_file: &str) -> ContainerIdentity {
    for line in cgroup_file.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let identity = from_path(path);
        if !identity.is_empty() {
            return identity;
        }
    }
    ContainerIdentity::default()
}

fn from_path(path: &str) -> ContainerIdentity {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let in_kubepods = segments.iter().any(|s| s.starts_with("kubepods"));
    let pod_uid = if in_kubepods { segments.iter().find_map(|s| pod_uid_of(s)) } else { None };
    // The innermost segment that is a container: a container may make child cgroups of its own.
    let container = segments.iter().enumerate().rev().find_map(|(i, s)| {
        let parent = i.checked_sub(1).map(|p| segments[p]);
        container_of(s, parent)
    });
    let (container_id, runtime) = match container {
        Some((id, runtime)) => (Some(id), runtime),
        None => (None, None),
    };
    ContainerIdentity { container_id, runtime, pod_uid }
}

/// `(id, runtime)` when a path segment is a container's own cgroup.
fn container_of(segment: &str, parent: Option<&str>) -> Option<(String, Option<&'static str>)> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    const PREFIXES: &[(&str, &str)] =
        &[("cri-containerd-", "containerd"), ("crio-", "cri-o"), ("docker-", "docker"), ("libpod-", "podman")];
    for (prefix, runtime) in PREFIXES {
        if let Some(id) = name.strip_prefix(prefix) {
            return is_container_id(id).then(|| (id.to_owned(), Some(*runtime)));
        }
    }
    if !is_container_id(name) {
        return None;
    }
    // A bare id (cgroupfs driver): the parent tells the runtime where it can. kubelet's
    // cgroupfs layout is the same for containerd and Docker, so it names none.
    let runtime = match parent {
        Some("docker") => Some("docker"),
        Some("libpod_parent") => Some("podman"),
        _ => None,
    };
    Some((name.to_owned(), runtime))
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The pod UID of kubelet's pod-level cgroup segment, dashed.
fn pod_uid_of(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".slice").unwrap_or(segment);
    // `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid>` (systemd, dashes in the uid as `_`).
    let start = name.rfind("pod")? + 3;
    let prefix = &name[..start - 3];
    if !(prefix.is_empty() || prefix.starts_with("kubepods")) {
        return None;
    }
    let uid = name[start..].replace('_', "-");
    is_uuid(&uid).then_some(uid)
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "7b5f8a3c1d2e4f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8";
    const UID: &str = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0";

    fn id(runtime: Option<&'static str>, pod: bool) -> ContainerIdentity {
        ContainerIdentity { container_id: Some(ID.into()), runtime, pod_uid: pod.then(|| UID.into()) }
    }

    #[test]
    fn kubernetes_systemd_driver_layouts() {
        let uid_ = UID.replace('-', "_");
        let containerd = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse(&containerd), id(Some("containerd"), true));
        let crio =
            format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/crio-{ID}.scope");
        assert_eq!(parse(&crio), id(Some("cri-o"), true));
        // Guaranteed QoS pods sit right under kubepods.slice.
        let guaranteed = format!("0::/kubepods.slice/kubepods-pod{uid_}.slice/docker-{ID}.scope");
        assert_eq!(parse(&guaranteed), id(Some("docker"), true));
    }

    #[test]
    fn kubernetes_cgroupfs_driver_layouts() {
        // cgroup v1: one line per hierarchy; the sandbox's memory line is not a container.
        let v1 = format!(
            "9:name=systemd:/\n8:pids:/kubepods/burstable/pod{UID}/{ID}\n4:memory:/process_api/1e21faf45c170999bf4f5e8eed170f58\n0::/\n"
        );
        assert_eq!(parse(&v1), id(None, true));
        let crio = format!("0::/kubepods/besteffort/pod{UID}/crio-{ID}");
        assert_eq!(parse(&crio), id(Some("cri-o"), true));
        // A process of the pod sandbox level (no container of its own) still has its pod.
        let pod_only = format!("0::/kubepods/pod{UID}");
        assert_eq!(parse(&pod_only), ContainerIdentity { pod_uid: Some(UID.into()), ..Default::default() });
    }

    #[test]
    fn docker_and_podman_outside_kubernetes() {
        assert_eq!(parse(&format!("0::/system.slice/docker-{ID}.scope")), id(Some("docker"), false));
        assert_eq!(parse(&format!("12:pids:/docker/{ID}\n")), id(Some("docker"), false));
        assert_eq!(parse(&format!("0::/machine.slice/libpod-{ID}.scope/container")), id(Some("podman"), false));
        assert_eq!(
            parse(&format!("0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope")),
            id(Some("podman"), false)
        );
        assert_eq!(parse(&format!("3:pids:/libpod_parent/libpod-{ID}")), id(Some("podman"), false));
    }

    #[test]
    fn not_containers() {
        for text in [
            "0::/user.slice/user-1000.slice/session-2.scope\n",
            "0::/system.slice/nginx.service\n",
            "4:memory:/process_api/1e21faf45c170999bf4f5e8eed170f58\n0::/\n",
            &format!("0::/machine.slice/libpod-conmon-{ID}.scope"),
            &format!("0::/system.slice/crio-conmon-{ID}.scope"),
            // A pod-looking segment outside kubelet's tree is not a pod.
            &format!("0::/system.slice/pod{UID}"),
            // One hex digit short.
            &format!("0::/docker/{}", &ID[1..]),
            "garbage",
            "",
        ] {
            assert_eq!(parse(text), ContainerIdentity::default(), "{text}");
        }
    }
}
