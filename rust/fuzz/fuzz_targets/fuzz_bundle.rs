//! Bundles: the header is forced to a valid bundle header so the fuzzer spends its time on the entries
//! (key/value lengths, UTF-8 keys, nested packets, depth).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenso_format::FLAG_BUNDLE;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some(mut v) = common::with_header(data) else {
        return;
    };
    let (_, dtype, _) = common::offsets(&v);
    common::set_flags(&mut v, FLAG_BUNDLE);
    v[dtype] = 0;
    common::exercise(&v);
});
