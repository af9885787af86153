//! Trace and span identifiers.

use std::{cell::RefCell, fmt};

use rand::{Rng, SeedableRng, rngs::SmallRng};

thread_local! {
    /// Ids need to be unique and unguessable enough, not cryptographic: a fast generator per
    /// thread, seeded from the OS-seeded thread RNG (ChaCha for every id cost ~2% of sonde's CPU).
    static IDS: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

fn random_bytes<const N: usize>() -> [u8; N] {
    IDS.with(|r| r.borrow_mut().random())
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TraceId(pub [u8; 16]);

#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    pub fn random() -> Self {
        loop {
            let id: [u8; 16] = random_bytes();
            if id != [0; 16] {
                return Self(id);
            }
        }
    }

    /// The low 8 bytes as a number, for ratio sampling (W3C: the right-most bytes are random).
    pub fn low_u64(&self) -> u64 {
        u64::from_be_bytes(self.0[8..].try_into().unwrap_or([0; 8]))
    }
}

impl SpanId {
    pub fn random() -> Self {
        loop {
            let id: [u8; 8] = random_bytes();
            if id != [0; 8] {
                return Self(id);
            }
        }
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
