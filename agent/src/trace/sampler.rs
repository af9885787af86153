//! Head sampling per `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`. Sampling decides what
//! spans are exported, never what metrics count.

use super::{context::TraceParent, ids::TraceId};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    /// Keep this fraction of traces, decided from the trace id (consistent across services).
    Ratio(f64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampler {
    pub root: Root,
    /// When true, a span with a remote parent follows the parent's sampled flag.
    pub parent_based: bool,
}

impl Default for Sampler {
    fn default() -> Self {
        Self { root: Root::AlwaysOn, parent_based: true }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplerError {
    #[error(
        "OTEL_TRACES_SAMPLER={0:?} is not supported; use always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
    )]
    Unknown(String),
    #[error("OTEL_TRACES_SAMPLER_ARG={0:?} must be a number between 0 and 1")]
    BadRatio(String),
}

impl Sampler {
    /// Builds the sampler from the two environment values (None when unset).
    pub fn from_env(name: Option<&str>, arg: Option<&str>) -> Result<Self, SamplerError> {
        let ratio = || -> Result<f64, SamplerError> {
            match arg {
                None => Ok(1.0),
                Some(a) => match a.trim().parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                    _ => Err(SamplerError::BadRatio(a.to_owned())),
                },
            }
        };
        let name = name.map(str::trim).unwrap_or("parentbased_always_on");
        let (root, parent_based) = match name {
            "always_on" => (Root::AlwaysOn, false),
            "always_off" => (Root::AlwaysOff, false),
            "traceidratio" => (Root::Ratio(ratio()?), false),
            "parentbased_always_on" | "" => (Root::AlwaysOn, true),
            "parentbased_always_off" => (Root::AlwaysOff, true),
            "parentbased_traceidratio" => (Root::Ratio(ratio()?), true),
            other => return Err(SamplerError::Unknown(other.to_owned())),
        };
        Ok(Self { root, parent_based })
    }

    /// Decision for a span that starts a trace here or continues a remote one.
    pub fn should_sample(&self, trace_id: TraceId, remote_parent: Option<&TraceParent>) -> bool {
        if self.parent_based
            && let Some(p) = remote_parent
        {
            return p.sampled;
        }
        (trace_id.low_u64() >> 1) < self.root_bound()
    }

    /// A new trace is sampled when its id's random low 63 bits are below this (the kernel's
    /// injection decides the same way for the traces it starts).
    pub fn root_bound(&self) -> u64 {
        match self.root {
            Root::AlwaysOn => u64::MAX,
            Root::AlwaysOff => 0,
            Root::Ratio(r) => (r * (1u64 << 63) as f64) as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::ids::SpanId;

    fn parent(sampled: bool) -> TraceParent {
        TraceParent { trace_id: TraceId([7; 16]), parent_id: SpanId([1; 8]), sampled }
    }

    #[test]
    fn default_is_parentbased_always_on() {
        let s = Sampler::from_env(None, None).unwrap();
        assert_eq!(s, Sampler::default());
        assert!(s.should_sample(TraceId::random(), None));
        assert!(!s.should_sample(TraceId::random(), Some(&parent(false))));
        assert!(s.should_sample(TraceId::random(), Some(&parent(true))));
    }

    #[test]
    fn non_parentbased_ignores_the_parent_flag() {
        let s = Sampler::from_env(Some("always_off"), None).unwrap();
        assert!(!s.should_sample(TraceId::random(), Some(&parent(true))));
        let s = Sampler::from_env(Some("always_on"), None).unwrap();
        assert!(s.should_sample(TraceId::random(), Some(&parent(false))));
    }

    #[test]
    fn ratio_keeps_about_that_fraction() {
        let s = Sampler::from_env(Some("traceidratio"), Some("0.25")).unwrap();
        let kept = (0..20_000).filter(|_| s.should_sample(TraceId::random(), None)).count();
        assert!((4_400..5_600).contains(&kept), "kept {kept} of 20000 at 0.25");
        let none = Sampler::from_env(Some("parentbased_traceidratio"), Some("0")).unwrap();
        assert!(!none.should_sample(TraceId::random(), None));
        assert!(none.should_sample(TraceId::random(), Some(&parent(true))));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = Sampler::from_env(Some("sometimes"), None).unwrap_err().to_string();
        assert!(e.contains("OTEL_TRACES_SAMPLER") && e.contains("traceidratio"), "{e}");
        let e = Sampler::from_env(Some("traceidratio"), Some("2")).unwrap_err().to_string();
        assert!(e.contains("OTEL_TRACES_SAMPLER_ARG"), "{e}");
    }
}
