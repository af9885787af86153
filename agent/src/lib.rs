//! sonde: an eBPF agent that rebuilds spans from the bytes processes send and receive.
//!
//! Data flows one way: capture -> conn (per-connection streams, detection) -> protocol
//! (parsing and pairing) -> trace (span assembly) -> export.

pub mod agent;
pub mod capture;
pub mod check;
pub mod clock;
pub mod config;
pub mod conn;
pub mod discovery;
pub mod export;
pub mod fuzzing;
pub mod k8s;
pub mod logs;
pub mod metrics;
pub mod pipeline;
pub mod poll_pace;
pub mod protocol;
pub mod stats;
pub mod trace;
pub mod tracer;
