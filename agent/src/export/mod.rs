//! Where finished spans go: stdout (text or JSON lines) and OTLP.

mod grpc_raw;
pub mod otlp;
pub mod otlp_encode;
pub mod otlp_logs;
pub mod otlp_metrics;
pub mod otlp_wire;
pub mod print;
pub mod settings;
pub mod tls;
mod transport;
