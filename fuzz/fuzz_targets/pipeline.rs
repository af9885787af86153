//! Connection table, detection, parsing, pairing and span assembly together: several
//! connections, opens and closes, truncated captures and clock steps.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sonde::fuzzing;

fuzz_target!(|data: &[u8]| {
    fuzzing::pipeline(data);
});
