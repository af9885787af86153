//! Protocol detection from the first bytes of a connection (never from the port alone).
//! Adding a protocol adds one line to [`detect`].

use super::{Session, Side, http};

pub enum Detection {
    Matched(Box<dyn Session>),
    /// These bytes belong to no protocol we know.
    NoMatch,
    /// Too few bytes to decide; call again with more.
    NeedMore,
}

/// Decides the protocol from the first bytes seen on one side of a connection.
pub fn detect(side: Side, bytes: &[u8]) -> Detection {
    let mut undecided = false;
    match http::classify_start(side, bytes) {
        Some(true) => return Detection::Matched(Box::new(http::HttpSession::default())),
        None => undecided = true,
        Some(false) => {}
    }
    if undecided {
        Detection::NeedMore
    } else {
        Detection::NoMatch
    }
}
