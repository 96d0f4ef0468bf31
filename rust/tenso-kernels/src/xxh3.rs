//! XXH3-64 (seed 0, default secret) with SIMD kernels for long inputs, chosen at run time.
//!
//! `xxhash-rust` is compiled for the build target: SSE2 on baseline x86-64. [`xxh3_64`] runs the long-input loop on
//! the widest vector unit the CPU has (AVX-512F, else AVX2) and everything else on `xxhash-rust`, the portable path
//! ([`Path`]; `TENSO_FORCE_PORTABLE=1` or [`crate::set_force_portable`] selects it everywhere). The digests are the
//! same on every path: the tests compare each kernel with `xxhash-rust` over many lengths and alignments.
//!
//! Only the long-input path of XXH3 (more than 240 bytes) is vectorized; shorter inputs, other architectures, Miri and
//! CPUs without AVX2 use `xxhash-rust`. The long path, as the XXH3 specification defines it for the default secret:
//!
//! * eight u64 accumulators start at fixed primes; the input is cut into 64-byte stripes and 1024-byte blocks
//!   (16 stripes: `(192 - 64) / 8`);
//! * stripe `s` of a block is mixed with the secret at byte `8·s`: for each lane `i`, `k = data[i] ^ secret[i]`,
//!   `acc[i ^ 1] += data[i]`, `acc[i] += lo32(k) · hi32(k)`;
//! * after each whole block the accumulators are scrambled: `acc ^= acc >> 47; acc ^= secret[128..192]; acc *=
//!   PRIME32_1`;
//! * the last, partial block takes its whole stripes except the final byte's (no scramble), then the input's last 64
//!   bytes are accumulated once more with the secret at byte `192 - 64 - 7`;
//! * the accumulators are merged pairwise with the secret from byte 11 into `len · PRIME64_1`, then avalanched.

/// Inputs up to this length take XXH3's short and mid-size paths, which `xxhash-rust` handles on every path.
pub const MID_SIZE_MAX: usize = 240;

/// An implementation of XXH3-64's long-input loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// One 512-bit accumulator (x86-64 with AVX-512F).
    Avx512,
    /// Two 256-bit accumulators (x86-64 with AVX2).
    Avx2,
    /// `xxhash-rust` as compiled for the build target.
    Portable,
}

impl Path {
    /// Every path, fastest first.
    pub const ALL: [Path; 3] = [Path::Avx512, Path::Avx2, Path::Portable];

    /// The name reported to Python (`tenso.tenso_rs._kernel_paths()`): `avx512`, `avx2` or `portable`.
    pub fn name(self) -> &'static str {
        match self {
            Path::Avx512 => "avx512",
            Path::Avx2 => "avx2",
            Path::Portable => "portable",
        }
    }

    /// Whether this CPU (and build) can run the path. Under Miri only the portable path is available.
    pub fn available(self) -> bool {
        match self {
            Path::Portable => true,
            #[cfg(all(target_arch = "x86_64", not(miri)))]
            Path::Avx512 => std::is_x86_feature_detected!("avx512f"),
            #[cfg(all(target_arch = "x86_64", not(miri)))]
            Path::Avx2 => std::is_x86_feature_detected!("avx2"),
            #[cfg(not(all(target_arch = "x86_64", not(miri))))]
            Path::Avx512 | Path::Avx2 => false,
        }
    }

    /// The fastest path this CPU can run, whatever the portable switch says.
    pub fn detect() -> Path {
        Path::ALL
            .into_iter()
            .find(|p| p.available())
            .unwrap_or(Path::Portable)
    }

    /// The path [`xxh3_64`] takes: [`Path::Portable`] when forced (see the crate docs), else [`Path::detect`].
    pub fn active() -> Path {
        if crate::portable_forced() {
            Path::Portable
        } else {
            Path::detect()
        }
    }
}

/// [`xxh3_64`] as `tenso-format`'s XXH3 plug-in (`DecodeOptions::with_xxh3`, `EncodeOptions::with_xxh3`).
pub const XXH3_FN: tenso_format::hash::Xxh3Fn = tenso_format::hash::Xxh3Fn(xxh3_64);

/// XXH3-64 (seed 0, default secret) of `data` on the [active](Path::active) path.
pub fn xxh3_64(data: &[u8]) -> u64 {
    if data.len() <= MID_SIZE_MAX {
        return portable(data);
    }
    run(Path::active(), data)
}

/// XXH3-64 of `data` on `path`; `None` when this CPU cannot run it ([`Path::available`]). For tests and benchmarks.
pub fn xxh3_64_on(path: Path, data: &[u8]) -> Option<u64> {
    path.available().then(|| run(path, data))
}

/// The digest on an available `path`.
fn run(path: Path, data: &[u8]) -> u64 {
    match path {
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        Path::Avx512 => x86::xxh3_64_avx512(data),
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        Path::Avx2 => x86::xxh3_64_avx2(data),
        _ => portable(data),
    }
}

/// The portable path: `xxhash-rust`.
fn portable(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

#[cfg(all(target_arch = "x86_64", not(miri)))]
mod x86 {
    use std::arch::x86_64::*;

    use super::MID_SIZE_MAX;

    const PRIME32_1: u64 = 0x9E37_79B1;
    const PRIME32_2: u64 = 0x85EB_CA77;
    const PRIME32_3: u64 = 0xC2B2_AE3D;
    const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
    const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
    const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
    const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;

    /// The accumulators' starting values.
    const INIT_ACC: [u64; 8] = [
        PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1,
    ];

    /// XXH3's default 192-byte secret (`kSecret` of the specification).
    const SECRET: [u8; 192] = [
        0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad,
        0x1c, //
        0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67,
        0x1f, //
        0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72,
        0x21, //
        0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26,
        0x4c, //
        0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e,
        0xa3, //
        0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac,
        0xd8, //
        0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f,
        0x1d, //
        0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73,
        0x64, //
        0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63,
        0xeb, //
        0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68,
        0x9e, //
        0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31,
        0xce, //
        0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40,
        0x7e, //
    ];

    const STRIPE: usize = 64;
    /// Bytes of secret skipped between consecutive stripes.
    const SECRET_STEP: usize = 8;
    const STRIPES_PER_BLOCK: usize = (SECRET.len() - STRIPE) / SECRET_STEP;
    const BLOCK: usize = STRIPE * STRIPES_PER_BLOCK;
    /// Where the scramble key starts.
    const SCRAMBLE_KEY: usize = SECRET.len() - STRIPE;
    /// Where the key of the input's last stripe starts.
    const LAST_STRIPE_KEY: usize = SECRET.len() - STRIPE - 7;
    /// How far ahead of the current stripe the kernels prefetch (a hint: it never faults, even past the input).
    const PREFETCH: usize = 512;
    /// Where the merge key starts.
    const MERGE_KEY: usize = 11;

    /// A 64-byte window of `bytes` from `at` (`bytes.len() >= at + 64`).
    #[inline(always)]
    fn window(bytes: &[u8], at: usize) -> &[u8; 64] {
        bytes[at..at + 64].try_into().expect("a 64-byte window")
    }

    fn read_u64(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
    }

    /// Folds the 128-bit product of `a` and `b` into 64 bits.
    fn mul_fold(a: u64, b: u64) -> u64 {
        let p = u128::from(a) * u128::from(b);
        (p as u64) ^ ((p >> 64) as u64)
    }

    /// Merges the accumulators of an input of `len` bytes into the digest.
    fn merge(acc: &[u64; 8], len: usize) -> u64 {
        let mut h = (len as u64).wrapping_mul(PRIME64_1);
        for pair in 0..4 {
            let a = acc[2 * pair] ^ read_u64(&SECRET, MERGE_KEY + 16 * pair);
            let b = acc[2 * pair + 1] ^ read_u64(&SECRET, MERGE_KEY + 16 * pair + 8);
            h = h.wrapping_add(mul_fold(a, b));
        }
        h ^= h >> 37;
        h = h.wrapping_mul(0x1656_6791_9E37_79F9);
        h ^ (h >> 32)
    }

    /// The stripe layout of a long input: the whole blocks, then the whole stripes of the last block except the one
    /// holding the final byte, then the input's last 64 bytes. `stripe` receives each piece with its key; `scramble`
    /// runs after each whole block with the scramble key. Both update the accumulator state `acc`.
    #[inline(always)]
    fn walk<A>(
        data: &[u8],
        acc: &mut A,
        stripe: impl Fn(&mut A, &[u8; 64], &[u8; 64]),
        scramble: impl Fn(&mut A, &[u8; 64]),
    ) {
        debug_assert!(data.len() > MID_SIZE_MAX);
        let blocks = (data.len() - 1) / BLOCK;
        let (whole, tail) = data.split_at(blocks * BLOCK);
        for block in whole.chunks_exact(BLOCK) {
            for s in 0..STRIPES_PER_BLOCK {
                stripe(
                    acc,
                    window(block, s * STRIPE),
                    window(&SECRET, s * SECRET_STEP),
                );
            }
            scramble(acc, window(&SECRET, SCRAMBLE_KEY));
        }
        let stripes = (tail.len() - 1) / STRIPE;
        for s in 0..stripes {
            stripe(
                acc,
                window(tail, s * STRIPE),
                window(&SECRET, s * SECRET_STEP),
            );
        }
        stripe(
            acc,
            window(data, data.len() - STRIPE),
            window(&SECRET, LAST_STRIPE_KEY),
        );
    }

    /// XXH3-64 with the AVX2 kernel for long inputs.
    pub(super) fn xxh3_64_avx2(data: &[u8]) -> u64 {
        if data.len() > MID_SIZE_MAX && std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (detected just above) and the input is long, as `long_avx2` requires.
            unsafe { long_avx2(data) }
        } else {
            super::portable(data)
        }
    }

    /// XXH3-64 with the AVX-512 kernel for long inputs.
    pub(super) fn xxh3_64_avx512(data: &[u8]) -> u64 {
        if data.len() > MID_SIZE_MAX && std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (detected just above) and the input is long, as `long_avx512` requires.
            unsafe { long_avx512(data) }
        } else {
            super::portable(data)
        }
    }

    /// The long-input digest, two 256-bit accumulators.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2, and `data.len() > 240`.
    #[target_feature(enable = "avx2")]
    unsafe fn long_avx2(data: &[u8]) -> u64 {
        let mut out = [0u64; 8];
        // SAFETY: AVX2 is available (this function's contract). Every load and store goes through a pointer to a
        // 64-byte array (`window` checks the bounds) or to `INIT_ACC` / `out` ([u64; 8], 64 bytes) at offset 0 or
        // 32, so it touches 32 in-bounds bytes; `loadu`/`storeu` have no alignment requirement. The prefetch address
        // is computed with `wrapping_add` and never dereferenced.
        unsafe {
            let init = INIT_ACC.as_ptr().cast::<__m256i>();
            let mut acc = [_mm256_loadu_si256(init), _mm256_loadu_si256(init.add(1))];
            let prime = _mm256_set1_epi32(PRIME32_1 as i32);
            walk(
                data,
                &mut acc,
                |acc, stripe, key| {
                    _mm_prefetch::<_MM_HINT_T0>(stripe.as_ptr().wrapping_add(PREFETCH).cast());
                    let d = stripe.as_ptr().cast::<__m256i>();
                    let k = key.as_ptr().cast::<__m256i>();
                    for (i, a) in acc.iter_mut().enumerate() {
                        let data = _mm256_loadu_si256(d.add(i));
                        let mixed = _mm256_xor_si256(data, _mm256_loadu_si256(k.add(i)));
                        // Multiply the low and high 32-bit halves of each mixed lane.
                        let product = _mm256_mul_epu32(mixed, _mm256_shuffle_epi32::<0x31>(mixed));
                        // Swap neighbouring 64-bit lanes: acc[i ^ 1] += data[i].
                        let swapped = _mm256_shuffle_epi32::<0x4E>(data);
                        // Sum off the accumulator's dependency chain, then one add on it.
                        *a = _mm256_add_epi64(*a, _mm256_add_epi64(swapped, product));
                    }
                },
                |acc, key| {
                    let k = key.as_ptr().cast::<__m256i>();
                    for (i, a) in acc.iter_mut().enumerate() {
                        let x = _mm256_xor_si256(*a, _mm256_srli_epi64::<47>(*a));
                        let x = _mm256_xor_si256(x, _mm256_loadu_si256(k.add(i)));
                        // x * PRIME32_1 mod 2^64 = lo32(x) * P + (hi32(x) * P << 32).
                        let lo = _mm256_mul_epu32(x, prime);
                        let hi = _mm256_mul_epu32(_mm256_shuffle_epi32::<0x31>(x), prime);
                        *a = _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(hi));
                    }
                },
            );
            let o = out.as_mut_ptr().cast::<__m256i>();
            _mm256_storeu_si256(o, acc[0]);
            _mm256_storeu_si256(o.add(1), acc[1]);
        }
        merge(&out, data.len())
    }

    /// The long-input digest, one 512-bit accumulator.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX-512F, and `data.len() > 240`.
    #[target_feature(enable = "avx512f")]
    unsafe fn long_avx512(data: &[u8]) -> u64 {
        let mut out = [0u64; 8];
        // SAFETY: AVX-512F is available (this function's contract). Every load and store goes through a pointer to a
        // 64-byte array (`window` checks the bounds) or to `INIT_ACC` / `out` ([u64; 8], 64 bytes), so it touches 64
        // in-bounds bytes; `loadu`/`storeu` have no alignment requirement. The prefetch address is computed with
        // `wrapping_add` and never dereferenced.
        unsafe {
            let mut acc = _mm512_loadu_si512(INIT_ACC.as_ptr().cast());
            let prime = _mm512_set1_epi32(PRIME32_1 as i32);
            walk(
                data,
                &mut acc,
                |acc, stripe, key| {
                    _mm_prefetch::<_MM_HINT_T0>(stripe.as_ptr().wrapping_add(PREFETCH).cast());
                    let data = _mm512_loadu_si512(stripe.as_ptr().cast());
                    let mixed = _mm512_xor_si512(data, _mm512_loadu_si512(key.as_ptr().cast()));
                    let product = _mm512_mul_epu32(mixed, _mm512_srli_epi64::<32>(mixed));
                    let swapped = _mm512_shuffle_epi32::<0x4E>(data);
                    // Sum off the accumulator's dependency chain, then one add on it.
                    *acc = _mm512_add_epi64(*acc, _mm512_add_epi64(swapped, product));
                },
                |acc, key| {
                    let x = _mm512_xor_si512(*acc, _mm512_srli_epi64::<47>(*acc));
                    let x = _mm512_xor_si512(x, _mm512_loadu_si512(key.as_ptr().cast()));
                    let lo = _mm512_mul_epu32(x, prime);
                    let hi = _mm512_mul_epu32(_mm512_srli_epi64::<32>(x), prime);
                    *acc = _mm512_add_epi64(lo, _mm512_slli_epi64::<32>(hi));
                },
            );
            _mm512_storeu_si512(out.as_mut_ptr().cast(), acc);
        }
        merge(&out, data.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_bytes as bytes;

    /// Every path this CPU runs, and the dispatching entry point, agree with `xxhash-rust` on `data`.
    fn check(data: &[u8]) {
        let want = xxhash_rust::xxh3::xxh3_64(data);
        assert_eq!(xxh3_64(data), want, "dispatch, length {}", data.len());
        for path in Path::ALL {
            if let Some(got) = xxh3_64_on(path, data) {
                assert_eq!(got, want, "{} kernel, length {}", path.name(), data.len());
            }
        }
    }

    #[test]
    fn every_length_and_alignment() {
        // Under Miri (portable path only, and slow) a sample of the lengths around each boundary of XXH3.
        let lengths: Vec<usize> = if cfg!(miri) {
            vec![
                0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 255, 1024, 1025, 1087, 2113,
            ]
        } else {
            (0..=4096).collect()
        };
        let offsets: &[usize] = if cfg!(miri) { &[0, 3] } else { &[0, 1, 7, 31] };
        let data = bytes(4096 + 64, 1);
        for &offset in offsets {
            for &len in &lengths {
                check(&data[offset..offset + len]);
            }
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "megabytes of input: too slow under Miri")]
    fn large_lengths() {
        let data = bytes((3 << 20) + 4096, 3);
        let block = 1024;
        for len in [
            5 * block,
            5 * block + 1,
            5 * block - 1,
            17 * block + 64,
            17 * block + 65,
            100_003,
            1 << 20,
            (1 << 20) + 63,
            (1 << 20) - 1,
            (3 << 20) + 17,
            (3 << 20) + 4096,
        ] {
            check(&data[..len]);
            check(&data[data.len() - len..]);
        }
        check(&vec![0u8; 1 << 20]);
        check(&vec![0xFFu8; (1 << 20) + 7]);
    }

    #[test]
    fn paths() {
        assert!(Path::Portable.available());
        assert!(Path::detect().available());
        assert_eq!(xxh3_64_on(Path::Portable, b""), Some(0x2D06_8005_38D3_94C2));
        if cfg!(miri) || !cfg!(target_arch = "x86_64") {
            assert_eq!(Path::detect(), Path::Portable);
        }
        let names: Vec<_> = Path::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(names, ["avx512", "avx2", "portable"]);
    }

    #[test]
    fn plugged_into_tenso_format() {
        let data = bytes(if cfg!(miri) { 3000 } else { (2 << 20) + 5 }, 4);
        let want = tenso_format::hash::xxh3_64_chunked(&data);
        assert_eq!(
            tenso_format::hash::xxh3_64_chunked_with(XXH3_FN, &data),
            want
        );
        let parts = [&data[..10], &data[10..]];
        assert_eq!(
            tenso_format::hash::xxh3_64_parts_with(XXH3_FN, &[&data]),
            tenso_format::hash::xxh3_64_parts(&parts)
        );
    }
}
