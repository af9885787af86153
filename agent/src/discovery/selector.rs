//! Selectors: which processes to trace, and under which service name.

use globset::{Glob, GlobMatcher};

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
#[derive(Clone, Debug)]
pub struct Selector {
    pub service_name: Option<String>,
    pub open_ports: Option<PortSet>,
    pub exe_path: Option<GlobMatcher>,
    pub pids: Vec<u32>,
}

/// What a selector looks at.
pub struct ProcessFacts<'a> {
    pub pid: u32,
    pub exe_path: &'a str,
    pub listen_ports: &'a [u16],
}

pub fn compile_glob(pattern: &str) -> Result<GlobMatcher, String> {
    Glob::new(pattern)
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("{pattern:?} is not a valid glob ({e}); use patterns like /usr/sbin/nginx or */python3*"))
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.open_ports.is_none() && self.exe_path.is_none() && self.pids.is_empty()
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
        true
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
        };
        let facts = |exe, ports: &'static [u16]| ProcessFacts { pid: 1, exe_path: exe, listen_ports: ports };
        assert!(s.matches(&facts("/usr/bin/python3.11", &[8080])));
        assert!(!s.matches(&facts("/usr/bin/python3.11", &[8081])));
        assert!(!s.matches(&facts("/usr/sbin/nginx", &[8080])));
        assert!(compile_glob("[").is_err());
    }
}
