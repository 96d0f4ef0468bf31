//! XXH3-64 integrity digests (feature `xxh3`).
//!
//! The footer is XXH3 64-bit, seed 0, default secret, stored little-endian right after the protected bytes.
//! v3 packets written by 0.19.4's `dumps` use a chunked variant for bodies of 1 MiB or more (FORMAT.md §5.3):
//!
//! ```text
//! chunked(body) = XXH3_64(body)                                  if len(body) <  1 MiB
//!               = XXH3_64(LE64(XXH3_64(c0)) ‖ LE64(XXH3_64(c1)) ‖ …)  otherwise, c_i = 1 MiB slices
//! ```
//!
//! Writers always use the plain digest; readers of v3 dense bodies try the chunked one as a fallback.
//!
//! # Pluggable fast path
//!
//! This crate is portable and free of `unsafe`, so its own XXH3 is `xxhash-rust` compiled for the build target (SSE2 on
//! baseline x86-64). An embedder may install a faster, bit-identical one-shot implementation once per process with
//! [`set_xxh3_64_impl`]; [`xxh3_64`], [`xxh3_64_chunked`] and [`xxh3_64_parts`] (and so encode footers, `seal` and
//! decode verification of single-piece bodies) then use it for inputs of [`FAST_PATH_MIN_LEN`] bytes or more. The
//! Python bindings install a SIMD implementation (AVX-512 / AVX2) chosen at run time. The streaming [`Hasher`] always
//! uses `xxhash-rust`.

use std::sync::OnceLock;

use crate::consts::CHUNKED_HASH_CHUNK;

/// Inputs shorter than this always use `xxhash-rust` (XXH3's short-input paths end at 240 bytes; a plugged
/// implementation only pays off on the long-input loop).
pub const FAST_PATH_MIN_LEN: usize = 1024;

/// A one-shot XXH3-64 (seed 0, default secret) implementation.
pub type Xxh3Impl = fn(&[u8]) -> u64;

static FAST_IMPL: OnceLock<Xxh3Impl> = OnceLock::new();

/// Installs a one-shot XXH3-64 implementation for long inputs (see the module docs). It must return exactly
/// `xxhash_rust::xxh3::xxh3_64(data)` for every input; only the first call per process takes effect, and the return
/// value says whether this call did.
pub fn set_xxh3_64_impl(f: Xxh3Impl) -> bool {
    FAST_IMPL.set(f).is_ok()
}

/// XXH3-64 (seed 0) of `data`.
#[inline]
pub fn xxh3_64(data: &[u8]) -> u64 {
    if data.len() >= FAST_PATH_MIN_LEN {
        if let Some(f) = FAST_IMPL.get() {
            return f(data);
        }
    }
    xxhash_rust::xxh3::xxh3_64(data)
}

/// XXH3-64 (seed 0) of the concatenation of `parts`. A single non-empty part takes the one-shot path ([`xxh3_64`]);
/// several go through the streaming [`Hasher`].
pub fn xxh3_64_parts(parts: &[&[u8]]) -> u64 {
    let mut non_empty = parts.iter().filter(|p| !p.is_empty());
    match (non_empty.next(), non_empty.next()) {
        (None, _) => xxh3_64(&[]),
        (Some(only), None) => xxh3_64(only),
        _ => {
            let mut h = Hasher::new();
            for p in parts {
                h.update(p);
            }
            h.digest()
        }
    }
}

/// The chunked variant of 0.19.4 (see the module docs).
pub fn xxh3_64_chunked(data: &[u8]) -> u64 {
    if data.len() < CHUNKED_HASH_CHUNK {
        return xxh3_64(data);
    }
    let mut h = Hasher::new();
    for chunk in data.chunks(CHUNKED_HASH_CHUNK) {
        h.update(&xxh3_64(chunk).to_le_bytes());
    }
    h.digest()
}

/// Streaming XXH3-64, for digests over several pieces (v4 quantized metadata ‖ codes).
#[derive(Clone)]
pub struct Hasher(xxhash_rust::xxh3::Xxh3);

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Hasher").field(&self.0.digest()).finish()
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Self::new()
    }
}

impl Hasher {
    /// A fresh hasher (seed 0).
    pub fn new() -> Self {
        Hasher(xxhash_rust::xxh3::Xxh3::new())
    }

    /// Appends bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The digest of everything appended so far.
    pub fn digest(&self) -> u64 {
        self.0.digest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        // FORMAT.md §9.5: XXH3 of the qint4 codes c8 3f 07.
        assert_eq!(
            xxh3_64(&[0xc8, 0x3f, 0x07]).to_le_bytes(),
            [0x7b, 0x8d, 0x53, 0xf7, 0xc1, 0x33, 0xc4, 0xdf]
        );
        let mut h = Hasher::new();
        h.update(&[0xc8]);
        h.update(&[0x3f, 0x07]);
        assert_eq!(h.digest(), xxh3_64(&[0xc8, 0x3f, 0x07]));
    }

    #[test]
    fn parts_match_concatenation() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 31 % 251) as u8).collect();
        let whole = xxhash_rust::xxh3::xxh3_64(&data);
        assert_eq!(xxh3_64_parts(&[&data]), whole);
        assert_eq!(xxh3_64_parts(&[&[], &data, &[]]), whole);
        assert_eq!(xxh3_64_parts(&[&data[..100], &data[100..]]), whole);
        assert_eq!(xxh3_64_parts(&[]), xxh3_64(b""));
        assert_eq!(xxh3_64_parts(&[&[], &[]]), xxh3_64(b""));
    }

    #[test]
    fn chunked_matches_definition() {
        let small = vec![7u8; 1000];
        assert_eq!(xxh3_64_chunked(&small), xxh3_64(&small));
        let big: Vec<u8> = (0..(CHUNKED_HASH_CHUNK + 5)).map(|i| i as u8).collect();
        let mut cat = Vec::new();
        cat.extend_from_slice(&xxh3_64(&big[..CHUNKED_HASH_CHUNK]).to_le_bytes());
        cat.extend_from_slice(&xxh3_64(&big[CHUNKED_HASH_CHUNK..]).to_le_bytes());
        assert_eq!(xxh3_64_chunked(&big), xxh3_64(&cat));
        let exact = vec![1u8; CHUNKED_HASH_CHUNK];
        assert_eq!(
            xxh3_64_chunked(&exact),
            xxh3_64(&xxh3_64(&exact).to_le_bytes())
        );
    }
}
