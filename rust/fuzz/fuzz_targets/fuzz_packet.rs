//! Any bytes through the top-level decoder, header inspection and dequantization.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    common::exercise(data);
    if let Some(v) = common::with_header(data) {
        common::exercise(&v);
    }
});
