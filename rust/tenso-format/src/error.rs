//! The one error type of the crate.

use std::fmt;

/// Everything that can go wrong while reading or writing a packet.
///
/// Messages are lowercase; where upstream tenso has a message for the same situation, ours starts with
/// its words ("packet too short", "invalid tenso packet", "integrity check failed", "packet exceeds
/// maximum dimensions", "packet exceeds maximum elements", "32-bit") and adds the detail after a colon.
/// The Python binding capitalises the first letter, which gives upstream's exact wording.
///
/// Variants carry the offsets and values involved so that a message can say what was wrong and where.
/// Offsets are relative to the first byte of the innermost packet being decoded (for a packet nested in a
/// bundle or sparse packet, that packet's own first byte).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// The buffer (or stream) ended before the packet did.
    Truncated {
        /// Bytes the packet needs at least.
        needed: usize,
        /// Bytes that were available.
        available: usize,
    },
    /// The first four bytes are not `TNSO`.
    BadMagic {
        /// The bytes found instead.
        found: [u8; 4],
    },
    /// The version byte is neither 3 nor 4.
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// A dtype code that is not valid where it was found.
    UnknownDType {
        /// The code found.
        code: u8,
    },
    /// A dtype that cannot be written (used by encoders of other crates).
    UnsupportedDType {
        /// The dtype's name.
        name: String,
    },
    /// More shape entries than allowed.
    TooManyDims {
        /// Declared number of dimensions.
        ndim: usize,
        /// The limit.
        limit: usize,
    },
    /// The element count exceeds the limit (saturated at `u128::MAX` if it overflows).
    TooManyElements {
        /// Declared number of elements.
        count: u128,
        /// The limit.
        limit: u64,
    },
    /// A dimension does not fit in the 32-bit shape slot (encode).
    DimTooLarge {
        /// The dimension.
        dim: u64,
    },
    /// Alignment is zero, not a power of two or too large.
    BadAlignment {
        /// The alignment requested.
        alignment: u64,
    },
    /// A custom-alignment exponent above 63.
    BadAlignExponent {
        /// The exponent byte.
        exponent: u8,
    },
    /// The XXH3-64 footer does not match the protected bytes.
    Integrity {
        /// The digest stored in the footer.
        expected: u64,
        /// The digest computed over the bytes.
        found: u64,
    },
    /// The LZ4 data could not be decompressed.
    Lz4 {
        /// What the decompressor reported.
        reason: &'static str,
    },
    /// An LZ4 frame that stops before its end mark (or before the content checksum its descriptor announces): the
    /// blocks that are there may decode, but the frame was cut off.
    Lz4NoEndMark {
        /// Bytes of the body that hold the frame so far.
        available: usize,
        /// Bytes the frame needs at least (up to the next block size word, end mark or checksum).
        needed: usize,
    },
    /// An LZ4 frame whose content-size field disagrees with what its blocks decode to.
    Lz4ContentSize {
        /// The value of the frame descriptor's content-size field.
        declared: u64,
        /// Bytes the blocks decode to.
        decoded: usize,
    },
    /// The decompressed body does not have the size the shape requires.
    DecompressedSize {
        /// `N * itemsize` from the shape.
        expected: usize,
        /// Size produced (or at least produced) by the decompressor.
        found: usize,
    },
    /// A bundle with more entries than its one-byte count can hold (encode).
    TooManyEntries {
        /// Entries given.
        count: usize,
        /// The limit (255).
        limit: usize,
    },
    /// A bundle key that is not valid UTF-8.
    BadKey {
        /// Offset of the key's first byte.
        offset: usize,
    },
    /// Containers nested deeper than the limit.
    NestingTooDeep {
        /// The limit.
        limit: usize,
    },
    /// Flags that no known writer produces for this kind (or two kind flags at once).
    BadFlags {
        /// The raw flags field.
        flags: u16,
    },
    /// A structural error not covered by a more specific variant.
    Malformed {
        /// Offset where the problem was found.
        offset: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A sparse packet whose components are inconsistent.
    BadSparse {
        /// What is wrong.
        reason: &'static str,
    },
    /// Quantization metadata or arithmetic that is not valid.
    BadQuant {
        /// What is wrong.
        reason: &'static str,
    },
    /// A string of a string tensor that is not valid UTF-8.
    BadUtf8 {
        /// Index of the string.
        index: usize,
    },
    /// The packet cannot be framed from a stream (its length is not recorded).
    Unframeable {
        /// Why.
        reason: &'static str,
    },
    /// A valid construct that this build does not handle.
    Unsupported {
        /// What is not supported.
        what: &'static str,
    },
    /// Bytes left over after a packet nested in a container.
    TrailingBytes {
        /// Offset of the first unused byte.
        offset: usize,
    },
    /// A body given to the encoder does not have the size its shape requires.
    BodyLength {
        /// `N * itemsize` (or the packed code length).
        expected: usize,
        /// Length given.
        found: usize,
    },
    /// The output buffer given to `encode_into` does not have the planned length.
    OutputSize {
        /// The planned length.
        expected: usize,
        /// The buffer's length.
        found: usize,
    },
    /// A bool element that is neither 0 nor 1 (reported by [`crate::Dense::check_bool`]).
    BadBool {
        /// Index of the element.
        index: usize,
        /// Its byte value.
        value: u8,
    },
    /// A length does not fit its field (a value over 4 GiB in a bundle, a size over `usize`).
    LengthOverflow {
        /// Which length.
        what: &'static str,
    },
}

impl FormatError {
    /// True when the buffer or stream ended early: more bytes might make the packet valid.
    pub fn is_truncation(&self) -> bool {
        matches!(self, FormatError::Truncated { .. })
    }

    /// True when an integrity footer did not match.
    pub fn is_integrity(&self) -> bool {
        matches!(self, FormatError::Integrity { .. })
    }

    pub(crate) fn truncated(needed: usize, available: usize) -> Self {
        FormatError::Truncated { needed, available }
    }

    pub(crate) fn malformed(offset: usize, reason: &'static str) -> Self {
        FormatError::Malformed { offset, reason }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use FormatError::*;
        match self {
            Truncated { needed, available } => write!(
                f,
                "packet too short: needs at least {needed} bytes, {available} available"
            ),
            BadMagic { found } => write!(
                f,
                "invalid tenso packet: magic is {:02x} {:02x} {:02x} {:02x}, expected 54 4e 53 4f (\"TNSO\")",
                found[0], found[1], found[2], found[3]
            ),
            UnsupportedVersion { found } => {
                write!(f, "unsupported protocol version {found} (supported: 3, 4)")
            }
            UnknownDType { code } => write!(f, "unsupported or unknown dtype code {code}"),
            UnsupportedDType { name } => write!(f, "unsupported dtype: {name}"),
            TooManyDims { ndim, limit } => write!(
                f,
                "packet exceeds maximum dimensions: {ndim} dimensions, the maximum is {limit}"
            ),
            TooManyElements { count, limit } => {
                if *count == u128::MAX {
                    write!(
                        f,
                        "packet exceeds maximum elements: the element count overflows, the maximum is {limit}"
                    )
                } else {
                    write!(
                        f,
                        "packet exceeds maximum elements: {count} elements, the maximum is {limit}"
                    )
                }
            }
            DimTooLarge { dim } => write!(
                f,
                "dimension {dim} does not fit in a 32-bit shape field (maximum {})",
                u32::MAX
            ),
            BadAlignment { alignment } => write!(
                f,
                "alignment must be a power of two between 1 and 2^63, got {alignment}"
            ),
            BadAlignExponent { exponent } => write!(
                f,
                "alignment exponent {exponent} is too large (maximum 63)"
            ),
            Integrity { expected, found } => write!(
                f,
                "integrity check failed: xxh3 mismatch (footer {expected:#018x}, computed {found:#018x})"
            ),
            Lz4 { reason } => write!(f, "lz4 decompression failed: {reason}"),
            Lz4NoEndMark { available, needed } => write!(
                f,
                "lz4 frame is cut off before its end mark: it needs at least {needed} bytes, {available} available"
            ),
            Lz4ContentSize { declared, decoded } => write!(
                f,
                "lz4 frame's content size field says {declared} bytes but its blocks decode to {decoded}"
            ),
            DecompressedSize { expected, found } => write!(
                f,
                "decompressed body has {found} bytes, the shape requires {expected}"
            ),
            TooManyEntries { count, limit } => {
                write!(f, "bundle has {count} entries, the maximum is {limit}")
            }
            BadKey { offset } => write!(f, "bundle key at offset {offset} is not valid utf-8"),
            NestingTooDeep { limit } => {
                write!(f, "containers are nested more than {limit} levels deep")
            }
            BadFlags { flags } => write!(f, "invalid flags {flags:#06x} for this kind of packet"),
            Malformed { offset, reason } => {
                write!(f, "malformed tenso packet at offset {offset}: {reason}")
            }
            BadSparse { reason } => write!(f, "invalid sparse packet: {reason}"),
            BadQuant { reason } => write!(f, "invalid quantized tensor: {reason}"),
            BadUtf8 { index } => write!(f, "string {index} of the string tensor is not valid utf-8"),
            Unframeable { reason } => write!(f, "cannot frame packet from a stream: {reason}"),
            Unsupported { what } => write!(f, "unsupported: {what}"),
            TrailingBytes { offset } => write!(
                f,
                "nested packet does not fill its slice: unused bytes from offset {offset}"
            ),
            BodyLength { expected, found } => write!(
                f,
                "body has {found} bytes, the shape requires {expected}"
            ),
            OutputSize { expected, found } => write!(
                f,
                "output buffer has {found} bytes, the packet needs exactly {expected}"
            ),
            BadBool { index, value } => write!(
                f,
                "bool element {index} has byte value {value}, expected 0 or 1"
            ),
            LengthOverflow { what } => write!(f, "{what} is too large for its length field"),
        }
    }
}

impl std::error::Error for FormatError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_lowercase_and_informative() {
        let e = FormatError::Truncated {
            needed: 10,
            available: 3,
        };
        assert_eq!(
            e.to_string(),
            "packet too short: needs at least 10 bytes, 3 available"
        );
        assert!(e.is_truncation());
        assert!(!e.is_integrity());
        let e = FormatError::Integrity {
            expected: 1,
            found: 2,
        };
        assert!(e.is_integrity());
        assert!(e.to_string().starts_with("integrity check failed"));
        let all = [
            FormatError::BadMagic { found: *b"XXXX" },
            FormatError::UnsupportedVersion { found: 5 },
            FormatError::BadFlags { flags: 0x0800 },
            FormatError::TooManyElements {
                count: u128::MAX,
                limit: 5,
            },
            FormatError::Malformed {
                offset: 3,
                reason: "x",
            },
        ];
        for e in all {
            let s = e.to_string();
            assert!(s.chars().next().unwrap().is_lowercase(), "{s}");
        }
    }
}
