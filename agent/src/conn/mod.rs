//! Connections: per (pid, fd) byte streams in both directions, the role of the traced process
//! on them, their addresses, and which protocol session parses them.

pub mod table;

pub use table::{ConnKey, ConnTable, Role};
