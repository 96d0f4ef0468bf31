//! The fixed packet header and little-endian read helpers.
//!
//! ```text
//! v3 (8 bytes)                          v4 (10 bytes)
//! off size field                        off size field
//!   0   4  magic "TNSO"                   0   4  magic "TNSO"
//!   4   1  version = 03                   4   1  version = 04
//!   5   1  flags (u8)                     5   2  flags (u16 LE)
//!   6   1  dtype code                     7   1  dtype code
//!   7   1  ndim / bundle entry count      8   1  ndim / bundle entry count
//!                                         9   1  reserved (00; 01 marks a GPU IPC reference)
//! ```

use crate::consts::*;
use crate::dtype::{SparseFormat, Version};
use crate::error::FormatError;

/// The kind of packet a header selects (FORMAT.md §13 dispatch), as returned by [`Header::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketKind {
    /// Dense array.
    Dense,
    /// Bundle.
    Bundle,
    /// Sparse matrix of the given format.
    Sparse(SparseFormat),
    /// Quantized tensor.
    Quantized,
    /// v4 string tensor.
    Strings,
    /// v4 direct ragged framing (not decodable here).
    Ragged,
    /// v4 GPU IPC reference (not decodable here).
    GpuIpcRef,
}

impl PacketKind {
    /// `"dense"`, `"bundle"`, `"sparse"`, `"quantized"`, `"string"`, `"ragged"` or `"gpu_ipc_ref"`.
    pub fn name(self) -> &'static str {
        match self {
            PacketKind::Dense => "dense",
            PacketKind::Bundle => "bundle",
            PacketKind::Sparse(_) => "sparse",
            PacketKind::Quantized => "quantized",
            PacketKind::Strings => "string",
            PacketKind::Ragged => "ragged",
            PacketKind::GpuIpcRef => "gpu_ipc_ref",
        }
    }
}

/// The decoded fixed header of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version.
    pub version: Version,
    /// Raw flags (v3: the u8 widened).
    pub flags: u16,
    /// Dtype code (0 for bundle and sparse headers).
    pub dtype_code: u8,
    /// `ndim`, or the entry count of a bundle.
    pub count: u8,
    /// v4 reserved byte (0 for v3).
    pub reserved: u8,
}

impl Header {
    /// Header size of this packet's version.
    pub fn len(&self) -> usize {
        self.version.header_len()
    }

    /// Always false: a header is never empty (present for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// True when every bit of `mask` is set.
    pub fn has(&self, mask: u16) -> bool {
        self.flags & mask == mask
    }

    /// The kind of packet this header selects: the one dispatch that the decoder, the stream framer
    /// and `packet_info` share (FORMAT.md §13).
    ///
    /// ```text
    /// unknown flag bits         → FormatError::BadFlags
    /// GPU_IPC_REF               → GpuIpcRef
    /// BUNDLE                    → Bundle
    /// SPARSE_COO | CSR | CSC    → Sparse(format)   (two sparse bits: FormatError::BadFlags)
    /// STRING                    → Strings
    /// RAGGED                    → Ragged
    /// dtype 16..19              → Quantized
    /// otherwise                 → Dense
    /// ```
    ///
    /// Only the flag bits that select the kind are looked at here; each kind's reader then refuses
    /// flags that do not apply to it.
    pub fn kind(&self) -> Result<PacketKind, FormatError> {
        let f = self.flags;
        if f & !KNOWN_FLAGS != 0 {
            return Err(FormatError::BadFlags { flags: f });
        }
        Ok(if f & FLAG_GPU_IPC_REF != 0 {
            PacketKind::GpuIpcRef
        } else if f & FLAG_BUNDLE != 0 {
            PacketKind::Bundle
        } else if f & SPARSE_FLAGS != 0 {
            PacketKind::Sparse(SparseFormat::from_flags(f)?)
        } else if f & FLAG_STRING != 0 {
            PacketKind::Strings
        } else if f & FLAG_RAGGED != 0 {
            PacketKind::Ragged
        } else if (QDTYPE_QINT8..=QDTYPE_QUINT4).contains(&self.dtype_code) {
            PacketKind::Quantized
        } else {
            PacketKind::Dense
        })
    }

    /// Writes the header into `out` (which must be at least `len()` bytes).
    pub(crate) fn write(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&MAGIC);
        out[4] = self.version.byte();
        match self.version {
            Version::V3 => {
                out[5] = self.flags as u8;
                out[6] = self.dtype_code;
                out[7] = self.count;
            }
            Version::V4 => {
                out[5..7].copy_from_slice(&self.flags.to_le_bytes());
                out[7] = self.dtype_code;
                out[8] = self.count;
                out[9] = self.reserved;
            }
        }
    }
}

/// Parses the header at the start of `buf`: checks the magic, accepts exactly versions 3 and 4 and
/// requires the whole header to be present.
pub fn parse_header(buf: &[u8]) -> Result<Header, FormatError> {
    if buf.len() < HEADER_SIZE_V3 {
        return Err(FormatError::truncated(HEADER_SIZE_V3, buf.len()));
    }
    let magic = [buf[0], buf[1], buf[2], buf[3]];
    if magic != MAGIC {
        return Err(FormatError::BadMagic { found: magic });
    }
    let version = Version::from_byte(buf[4])?;
    match version {
        Version::V3 => Ok(Header {
            version,
            flags: u16::from(buf[5]),
            dtype_code: buf[6],
            count: buf[7],
            reserved: 0,
        }),
        Version::V4 => {
            if buf.len() < HEADER_SIZE_V4 {
                return Err(FormatError::truncated(HEADER_SIZE_V4, buf.len()));
            }
            Ok(Header {
                version,
                flags: u16::from_le_bytes([buf[5], buf[6]]),
                dtype_code: buf[7],
                count: buf[8],
                reserved: buf[9],
            })
        }
    }
}

/// `base + add`, or a truncation error when it overflows.
pub(crate) fn add(base: usize, add: usize) -> Result<usize, FormatError> {
    base.checked_add(add)
        .ok_or(FormatError::LengthOverflow { what: "offset" })
}

/// `buf[at..at+len]`, or a truncation error.
pub(crate) fn slice(buf: &[u8], at: usize, len: usize) -> Result<&[u8], FormatError> {
    let end = add(at, len)?;
    buf.get(at..end)
        .ok_or(FormatError::truncated(end, buf.len()))
}

/// The u32 LE at `at`.
pub(crate) fn read_u32(buf: &[u8], at: usize) -> Result<u32, FormatError> {
    let s = slice(buf, at, 4)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// The u64 LE at `at`.
pub(crate) fn read_u64(buf: &[u8], at: usize) -> Result<u64, FormatError> {
    let s = slice(buf, at, 8)?;
    let mut b = [0u8; 8];
    b.copy_from_slice(s);
    Ok(u64::from_le_bytes(b))
}

/// The u8 at `at`.
pub(crate) fn read_u8(buf: &[u8], at: usize) -> Result<u8, FormatError> {
    buf.get(at)
        .copied()
        .ok_or(FormatError::truncated(at + 1, buf.len()))
}

/// Padding that moves `pos` to the next multiple of `align` (a power of two).
pub(crate) fn pad_to(pos: u64, align: u64) -> u64 {
    (align - pos % align) % align
}

/// Product of the shape, checked against `limit` (the count saturates in the error).
pub(crate) fn checked_elements(shape: &[u64], limit: u64) -> Result<u64, FormatError> {
    let mut n: u128 = 1;
    for &d in shape {
        n = n.saturating_mul(u128::from(d));
    }
    if n > u128::from(limit) {
        // A zero dimension makes the product 0 even after a saturated prefix, so recompute exactly.
        if shape.contains(&0) {
            return Ok(0);
        }
        return Err(FormatError::TooManyElements { count: n, limit });
    }
    Ok(n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_versions() {
        let h = parse_header(&[b'T', b'N', b'S', b'O', 3, 1, 5, 2]).unwrap();
        assert_eq!(
            (h.version, h.flags, h.dtype_code, h.count),
            (Version::V3, 1, 5, 2)
        );
        let h = parse_header(&[b'T', b'N', b'S', b'O', 4, 1, 1, 20, 1, 0]).unwrap();
        assert_eq!(
            (h.version, h.flags, h.dtype_code, h.count),
            (Version::V4, 0x101, 20, 1)
        );
        let mut out = [0u8; 10];
        h.write(&mut out);
        assert_eq!(parse_header(&out).unwrap(), h);
    }

    #[test]
    fn rejects_bad_headers() {
        assert!(parse_header(b"TNSO").unwrap_err().is_truncation());
        assert!(matches!(
            parse_header(b"XNSO\x03\x01\x01\x01"),
            Err(FormatError::BadMagic { .. })
        ));
        assert!(matches!(
            parse_header(b"TNSO\x05\x01\x01\x01"),
            Err(FormatError::UnsupportedVersion { found: 5 })
        ));
        assert!(parse_header(b"TNSO\x04\x01\x00\x01")
            .unwrap_err()
            .is_truncation());
    }

    #[test]
    fn element_products() {
        assert_eq!(checked_elements(&[], 10).unwrap(), 1);
        assert_eq!(checked_elements(&[0, u64::MAX, u64::MAX], 10).unwrap(), 0);
        assert!(checked_elements(&[1 << 32, 1 << 32], u64::MAX).is_err());
        assert!(checked_elements(&[11], 10).is_err());
        assert_eq!(pad_to(13, 64), 51);
        assert_eq!(pad_to(64, 64), 0);
    }
}
