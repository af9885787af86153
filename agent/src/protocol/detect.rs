//! Protocol detection from the first bytes of a connection (never from the port alone).
//! Adding a protocol adds one line to [`detect`].

use super::{Session, Side, http, http2, postgres, redis};

pub enum Detection {
    Matched(Box<dyn Session>),
    /// These bytes belong to no protocol we know.
    NoMatch,
    /// Too few bytes to decide; call again with more.
    NeedMore,
}

type Classifier = fn(Side, &[u8]) -> Option<bool>;
type Maker = fn(&[u8]) -> Box<dyn Session>;

/// Each protocol: how its first bytes look, and how to start its session.
const PROTOCOLS: [(Classifier, Maker); 4] = [
    (http::classify_start, |_| Box::new(http::HttpSession::default())),
    (http2::classify_start, |b| Box::new(http2::Http2Session::new(b))),
    (
        |side, b| {
            if side == Side::Request { postgres::classify_start(b) } else { Some(false) }
        },
        // A connection that starts with a typed message was seen mid-stream.
        |b| Box::new(postgres::PostgresSession::new(b.first().is_some_and(|c| *c != 0))),
    ),
    (
        |side, b| {
            if side == Side::Request { redis::classify_start(b) } else { Some(false) }
        },
        |_| Box::new(redis::RedisSession::default()),
    ),
];

/// Decides the protocol from the first bytes seen on one side of a connection.
pub fn detect(side: Side, bytes: &[u8]) -> Detection {
    let mut undecided = false;
    for (classify, make) in PROTOCOLS {
        match classify(side, bytes) {
            Some(true) => return Detection::Matched(make(bytes)),
            None => undecided = true,
            Some(false) => {}
        }
    }
    if undecided { Detection::NeedMore } else { Detection::NoMatch }
}
