//! Quantized packets: a quantized dtype and only the flags that apply are forced, so the fuzzer explores
//! the metadata (scheme, axis, group size, num_scales), alignment and codes of both layouts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenso_format::{FLAG_ALIGNED, FLAG_CUST_ALIGN, FLAG_INTEGRITY};

mod common;

fuzz_target!(|data: &[u8]| {
    let Some(mut v) = common::with_header(data) else {
        return;
    };
    let (flags_at, dtype, ndim) = common::offsets(&v);
    let flags = u16::from(v[flags_at]) & (FLAG_ALIGNED | FLAG_CUST_ALIGN | FLAG_INTEGRITY);
    common::set_flags(&mut v, flags);
    v[dtype] = 16 + v[dtype] % 4;
    v[ndim] %= 6;
    common::exercise(&v);
});
