//! XXH3-64 integrity digests (feature `xxh3`; the [`Xxh3Fn`] seam is always there).
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
//! # A faster XXH3
//!
//! This crate is portable and free of `unsafe`, so its own XXH3 is `xxhash-rust` compiled for the build target (SSE2 on
//! baseline x86-64). A caller with a faster, bit-identical one-shot implementation (the Python binding passes
//! `tenso-kernels`' AVX-512 / AVX2 one, chosen at run time) hands it over as an [`Xxh3Fn`] in
//! [`DecodeOptions::xxh3`](crate::DecodeOptions::xxh3) and [`EncodeOptions::xxh3`](crate::EncodeOptions::xxh3)
//! (used by decode verification, encode footers and [`seal_with`](crate::seal_with)), or to the `*_with` functions
//! here. Digests over several pieces use the streaming [`Hasher`], which is always `xxhash-rust`. Without the `xxh3`
//! feature only [`Xxh3Fn`] exists, and integrity footers are unsupported whatever the options carry.

#[cfg(feature = "xxh3")]
use crate::consts::CHUNKED_HASH_CHUNK;

/// A one-shot XXH3-64 (seed 0, default secret) implementation. It must return exactly what `xxhash-rust`'s
/// `xxh3::xxh3_64` does for every input: the format relies on it and nothing checks it.
///
/// Two of them compare equal whichever implementations they wrap, since all of them compute the same function.
#[derive(Clone, Copy)]
pub struct Xxh3Fn(pub fn(&[u8]) -> u64);

impl Xxh3Fn {
    /// `xxhash-rust`, the implementation used when the options carry none.
    #[cfg(feature = "xxh3")]
    pub const XXHASH_RUST: Xxh3Fn = Xxh3Fn(xxhash_rust::xxh3::xxh3_64);

    /// The digest of `data`.
    #[inline]
    pub fn digest(self, data: &[u8]) -> u64 {
        (self.0)(data)
    }
}

impl PartialEq for Xxh3Fn {
    fn eq(&self, _: &Self) -> bool {
        // Every implementation computes XXH3-64 (the type's contract), so they are interchangeable. Comparing the
        // pointers would not even be reliable: one function may have several addresses.
        true
    }
}

impl Eq for Xxh3Fn {}

impl std::fmt::Debug for Xxh3Fn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Xxh3Fn(..)")
    }
}

/// `f`, or [`Xxh3Fn::XXHASH_RUST`] when the options carry none.
#[cfg(feature = "xxh3")]
pub(crate) fn or_default(f: Option<Xxh3Fn>) -> Xxh3Fn {
    f.unwrap_or(Xxh3Fn::XXHASH_RUST)
}

/// XXH3-64 (seed 0) of `data` (`xxhash-rust`).
#[cfg(feature = "xxh3")]
#[inline]
pub fn xxh3_64(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

/// XXH3-64 (seed 0) of the concatenation of `parts` (`xxhash-rust`).
#[cfg(feature = "xxh3")]
pub fn xxh3_64_parts(parts: &[&[u8]]) -> u64 {
    xxh3_64_parts_with(Xxh3Fn::XXHASH_RUST, parts)
}

/// XXH3-64 (seed 0) of the concatenation of `parts`. A single non-empty part is hashed in one shot by `f`; several go
/// through the streaming [`Hasher`].
#[cfg(feature = "xxh3")]
pub fn xxh3_64_parts_with(f: Xxh3Fn, parts: &[&[u8]]) -> u64 {
    let mut non_empty = parts.iter().filter(|p| !p.is_empty());
    match (non_empty.next(), non_empty.next()) {
        (None, _) => f.digest(&[]),
        (Some(only), None) => f.digest(only),
        _ => {
            let mut h = Hasher::new();
            for p in parts {
                h.update(p);
            }
            h.digest()
        }
    }
}

/// The chunked variant of 0.19.4 (see the module docs), with `xxhash-rust`.
#[cfg(feature = "xxh3")]
pub fn xxh3_64_chunked(data: &[u8]) -> u64 {
    xxh3_64_chunked_with(Xxh3Fn::XXHASH_RUST, data)
}

/// The chunked variant of 0.19.4 (see the module docs), each chunk hashed by `f`.
#[cfg(feature = "xxh3")]
pub fn xxh3_64_chunked_with(f: Xxh3Fn, data: &[u8]) -> u64 {
    if data.len() < CHUNKED_HASH_CHUNK {
        return f.digest(data);
    }
    let mut h = Hasher::new();
    for chunk in data.chunks(CHUNKED_HASH_CHUNK) {
        h.update(&f.digest(chunk).to_le_bytes());
    }
    h.digest()
}

/// Streaming XXH3-64, for digests over several pieces (v4 quantized metadata ‖ codes).
#[cfg(feature = "xxh3")]
#[derive(Clone)]
pub struct Hasher(xxhash_rust::xxh3::Xxh3);

#[cfg(feature = "xxh3")]
impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Hasher").field(&self.0.digest()).finish()
    }
}

#[cfg(feature = "xxh3")]
impl Default for Hasher {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "xxh3")]
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

#[cfg(all(test, feature = "xxh3"))]
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
    fn with_uses_the_given_implementation() {
        // A stand-in that is not XXH3 shows which calls go through `f`.
        let f = Xxh3Fn(|data| data.len() as u64);
        let data = vec![5u8; CHUNKED_HASH_CHUNK + 3];
        assert_eq!(xxh3_64_parts_with(f, &[&[], &data[..7]]), 7);
        assert_eq!(xxh3_64_parts_with(f, &[]), 0);
        let streamed = xxh3_64_parts(&[&data[..1], &data[1..2]]);
        assert_eq!(xxh3_64_parts_with(f, &[&data[..1], &data[1..2]]), streamed);
        assert_eq!(xxh3_64_chunked_with(f, &data[..100]), 100);
        let mut cat = Vec::new();
        cat.extend_from_slice(&(CHUNKED_HASH_CHUNK as u64).to_le_bytes());
        cat.extend_from_slice(&3u64.to_le_bytes());
        assert_eq!(xxh3_64_chunked_with(f, &data), xxh3_64(&cat));
        assert_eq!(Xxh3Fn::XXHASH_RUST.digest(b""), xxh3_64(b""));
        assert_eq!(
            Some(f),
            Some(Xxh3Fn::XXHASH_RUST),
            "implementations are interchangeable"
        );
        assert_eq!(format!("{f:?}"), "Xxh3Fn(..)");
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
