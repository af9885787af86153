//! The OpenTelemetry resource of a traced process.

use super::span::AttrValue;

/// Describes the process a span came from. Built once per traced process and shared.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub service_name: String,
    /// All attributes, `service.name` included, in export order.
    pub attributes: Vec<(String, AttrValue)>,
}

/// What discovery knows about a process.
#[derive(Clone, Debug)]
pub struct ProcessIdentity {
    pub pid: u32,
    pub service_name: String,
    pub exe_path: String,
    pub host_name: String,
    /// Process start time in clock ticks since boot; makes the instance id unique across pid reuse.
    pub start_ticks: u64,
    /// What discovery knows of where it runs: container, pod, `service.namespace`/`version`.
    pub platform: Vec<(String, AttrValue)>,
}

impl Resource {
    /// `extra` are user-given attributes (OTEL_RESOURCE_ATTRIBUTES): they never override what
    /// sonde knows about the process itself.
    pub fn for_process(p: &ProcessIdentity, extra: &[(String, String)]) -> Self {
        let exe_name = p.exe_path.rsplit('/').next().unwrap_or(&p.exe_path).to_owned();
        let mut attributes: Vec<(String, AttrValue)> = vec![
            ("service.name".into(), p.service_name.clone().into()),
            ("service.instance.id".into(), format!("{}-{}-{}", p.host_name, p.pid, p.start_ticks).into()),
            ("host.name".into(), p.host_name.clone().into()),
            ("process.pid".into(), AttrValue::Int(p.pid as i64)),
            ("process.executable.name".into(), exe_name.into()),
            ("process.executable.path".into(), p.exe_path.clone().into()),
            ("telemetry.sdk.name".into(), "sonde".into()),
            ("telemetry.sdk.language".into(), "rust".into()),
            ("telemetry.sdk.version".into(), env!("CARGO_PKG_VERSION").into()),
        ];
        attributes.extend(p.platform.iter().cloned());
        for (k, v) in extra {
            if !attributes.iter().any(|(known, _)| known == k) {
                attributes.push((k.clone(), v.clone().into()));
            }
        }
        Self { service_name: p.service_name.clone(), attributes }
    }
}

/// Parses `OTEL_RESOURCE_ATTRIBUTES` (`k1=v1,k2=v2`, values percent-encoded).
pub fn parse_resource_attributes(raw: &str) -> Result<Vec<(String, String)>, String> {
    raw.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) =
                pair.split_once('=').ok_or_else(|| format!("OTEL_RESOURCE_ATTRIBUTES: {pair:?} is not key=value"))?;
            Ok((k.trim().to_owned(), percent_decode(v.trim())))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = ((b[i + 1] as char).to_digit(16), (b[i + 2] as char).to_digit(16))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_attributes_parse_and_decode() {
        let got = parse_resource_attributes("deployment.environment=prod, team=a%20b,").unwrap();
        assert_eq!(got, vec![("deployment.environment".into(), "prod".into()), ("team".into(), "a b".into())]);
        assert!(parse_resource_attributes("novalue").unwrap_err().contains("novalue"));
    }

    #[test]
    fn user_attributes_do_not_override_process_facts() {
        let p = ProcessIdentity {
            pid: 7,
            service_name: "svc".into(),
            exe_path: "/usr/bin/python3.11".into(),
            host_name: "h".into(),
            start_ticks: 5,
            platform: vec![],
        };
        let r = Resource::for_process(&p, &[("process.pid".into(), "1".into()), ("env".into(), "x".into())]);
        let get = |k: &str| r.attributes.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(get("process.pid"), Some(AttrValue::Int(7)));
        assert_eq!(get("process.executable.name"), Some("python3.11".into()));
        assert_eq!(get("env"), Some("x".into()));
    }
}
