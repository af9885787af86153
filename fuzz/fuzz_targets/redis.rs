//! The redis parser alone: any bytes, both directions, any syscall boundaries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sonde::{fuzzing, protocol::Protocol};

fuzz_target!(|data: &[u8]| {
    fuzzing::session(Protocol::Redis, data);
});
