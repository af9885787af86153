//! sonde: an eBPF agent that rebuilds spans from the bytes processes send and receive.
//!
//! Data flows one way: capture -> conn (per-connection streams, detection) -> protocol
//! (parsing and pairing) -> trace (span assembly) -> export.

pub mod protocol;
pub mod trace;
pub mod conn;
pub mod capture;
pub mod discovery;
pub mod config;
pub mod export;
pub mod stats;
