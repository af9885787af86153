//! Kernel capture: loading and attaching the eBPF programs, the kernel maps discovery fills,
//! and decoding ring buffer records.

pub mod events;
pub mod inject;
pub mod loader;
mod map_types;
pub mod map_usage;
pub mod tls_probes;
mod traced_bits;
pub mod tracefs;
mod verifier_log;

pub use events::Event;
pub use loader::Capture;
