//! Protocol detection from the first bytes of a connection (never from the port alone).

use super::{Session, Side, http};

/// Picks the protocol from the first captured bytes seen on a connection, or None.
pub fn detect(side: Side, bytes: &[u8]) -> Option<Box<dyn Session>> {
    if http::looks_like_start(side, bytes) {
        return Some(Box::new(http::HttpSession::default()));
    }
    None
}
