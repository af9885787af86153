//! RED metrics from every finished request (sampled or not): OpenTelemetry semantic-convention
//! histograms, with a per-metric cap on series. Exposed to Prometheus ([`prometheus`]) and
//! exported over OTLP ([`crate::export::otlp_metrics`]) from the same store.

pub mod exemplars;
pub mod instruments;
pub mod openmetrics;
pub mod prometheus;
pub mod service_graph;
mod store;

pub use store::{HistogramPoint, MetricsStore, SeriesRef, SeriesSnapshot};
