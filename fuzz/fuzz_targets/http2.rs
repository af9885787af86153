//! The HTTP/2 parser (framing, HPACK, stream pairing) alone: any bytes, both directions, any
//! syscall boundaries, truncated captures.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sonde::{fuzzing, protocol::Protocol};

fuzz_target!(|data: &[u8]| {
    fuzzing::session(Protocol::Http2, data);
});
