//! Sparse packets: one sparse flag, dtype 0, ndim 2 are forced so the fuzzer explores the components and
//! their validation (lengths, index dtypes, indptr monotonicity, bounds).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenso_format::{FLAG_SPARSE, FLAG_SPARSE_CSC, FLAG_SPARSE_CSR};

mod common;

fuzz_target!(|data: &[u8]| {
    let Some(mut v) = common::with_header(data) else {
        return;
    };
    let (_, dtype, ndim) = common::offsets(&v);
    let flag = [FLAG_SPARSE, FLAG_SPARSE_CSR, FLAG_SPARSE_CSC][usize::from(v[ndim]) % 3];
    common::set_flags(&mut v, flag);
    v[dtype] = 0;
    v[ndim] = 2;
    common::exercise(&v);
});
