//! Canonical padding: the bytes a reader skips but a writer MUST write as zeros, and what follows the packet.
//!
//! A valid packet can still differ from what any writer produces in bytes that no reader looks at. This module finds
//! them, for validators (`tenso verify --strict`, `tenso inspect --json`); decoding never consults it.
//!
//! ```text
//! where (FORMAT.md)                               region checked for non-zero bytes
//! dense / quantized / string packet (§4.2, §9, §10)  from after the shape (quantized: after the metadata) and the
//!                                                  alignment exponent byte, up to the body: the padding
//! v4 header (§3.2)                                the reserved byte 9 (writers put 00; 01 is a GPU reference,
//!                                                  which decoding already rejects)
//! bundle (§7.1), sparse (§8.1)                    no padding of their own: entries and components follow each
//!                                                  other back to back and each fills its length field exactly
//!                                                  (decoding enforces that), so only the nested packets are walked
//! after the top-level packet (§4.1)               reported as the packet's end offset; bytes past it are trailing
//! ```
//!
//! A top-level compressed dense packet records no length (§6.2): its body runs to the end of the buffer, so no
//! trailing bytes can be told apart from it and its end is reported as unknown.

use crate::consts::{FLAG_COMPRESSION, FLAG_CUST_ALIGN};
use crate::decode::{body_start, decode_prefix, DecodeOptions};
use crate::dtype::Version;
use crate::error::FormatError;
use crate::header::{add, parse_header, read_u32, slice, PacketKind};

/// One step from a packet to a packet nested in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathStep {
    /// The value of the bundle entry with this key.
    Entry(String),
    /// Component 0, 1 or 2 of a sparse matrix (COO: row, col, data; CSR/CSC: indptr, indices, data).
    Component(u8),
}

/// Which kind of ignored byte a [`NonZeroPadding`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaddingKind {
    /// The zero padding before a body (§4.2).
    Body,
    /// The v4 header's reserved byte (§3.2).
    Reserved,
}

impl PaddingKind {
    /// `"body padding"` or `"reserved header byte"`.
    pub fn name(self) -> &'static str {
        match self {
            PaddingKind::Body => "body padding",
            PaddingKind::Reserved => "reserved header byte",
        }
    }
}

/// A region of ignored bytes with at least one non-zero byte. Offsets are from the start of the checked buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonZeroPadding {
    /// From the top-level packet down to the packet holding the region (empty: the top-level packet).
    pub path: Vec<PathStep>,
    /// What the region is.
    pub kind: PaddingKind,
    /// First byte of the region.
    pub offset: usize,
    /// Length of the region.
    pub len: usize,
    /// The first non-zero byte in it.
    pub first_nonzero: usize,
    /// How many of its bytes are non-zero.
    pub nonzero: usize,
}

/// What [`check_padding`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PaddingReport {
    /// Every region with non-zero bytes, in wire order.
    pub nonzero: Vec<NonZeroPadding>,
    /// Where the packet ends (bytes from here on are trailing); None for a top-level compressed dense packet.
    pub end: Option<usize>,
}

impl PaddingReport {
    /// True when every ignored byte is zero and nothing follows the packet (as far as can be told).
    pub fn is_canonical(&self, buf_len: usize) -> bool {
        self.nonzero.is_empty() && self.end.is_none_or(|e| e == buf_len)
    }
}

/// Validates the packet at the start of `buf` (as [`decode_prefix`] with `opts`) and reports its non-zero padding
/// and where it ends. An invalid packet is the decoding error; the walk itself reads only what decoding accepted.
pub fn check_padding(buf: &[u8], opts: &DecodeOptions) -> Result<PaddingReport, FormatError> {
    let (_, end) = decode_prefix(buf, opts)?;
    let h = parse_header(buf)?;
    let compressed = h.kind()? == PacketKind::Dense && h.flags & FLAG_COMPRESSION != 0;
    let mut report = PaddingReport {
        nonzero: Vec::new(),
        end: (!compressed).then_some(end),
    };
    let packet = if compressed { buf } else { &buf[..end] };
    walk(packet, 0, &mut Vec::new(), &mut report.nonzero)?;
    Ok(report)
}

/// Records the non-zero regions of the valid packet `buf`, which starts at `base` in the checked buffer. The depth
/// is bounded by the decoder's nesting limit, which accepted this packet.
fn walk(
    buf: &[u8],
    base: usize,
    path: &mut Vec<PathStep>,
    out: &mut Vec<NonZeroPadding>,
) -> Result<(), FormatError> {
    let h = parse_header(buf)?;
    if h.version == Version::V4 {
        note(out, path, PaddingKind::Reserved, base + 9, &buf[9..10]);
    }
    // Where the exponent byte (if any) and the padding of a packet with a body start.
    let padded_from = match h.kind()? {
        PacketKind::Bundle => {
            let mut pos = h.len();
            for _ in 0..h.count {
                let klen = read_u32(buf, pos)? as usize;
                let key_at = add(pos, 4)?;
                let key = String::from_utf8_lossy(slice(buf, key_at, klen)?).into_owned();
                let vlen_at = add(key_at, klen)?;
                let vlen = read_u32(buf, vlen_at)? as usize;
                let value_at = add(vlen_at, 4)?;
                path.push(PathStep::Entry(key));
                let walked = walk(slice(buf, value_at, vlen)?, base + value_at, path, out);
                path.pop();
                walked?;
                pos = add(value_at, vlen)?;
            }
            return Ok(());
        }
        PacketKind::Sparse(_) => {
            let mut pos = h.len() + 8;
            for i in 0..3u8 {
                let n = read_u32(buf, pos)? as usize;
                path.push(PathStep::Component(i));
                let walked = walk(slice(buf, pos + 4, n)?, base + pos + 4, path, out);
                path.pop();
                walked?;
                pos = add(pos, 4 + n)?;
            }
            return Ok(());
        }
        PacketKind::Dense => h.len() + 4 * usize::from(h.count),
        PacketKind::Strings => h.len() + 4,
        PacketKind::Quantized => {
            // scheme u8, [axis u8 in v4], group_size u32, num_scales u32, scales, zero points (§9.1)
            let counts =
                h.len() + 4 * usize::from(h.count) + if h.version == Version::V4 { 2 } else { 1 };
            let num_scales = read_u32(buf, counts + 4)? as usize;
            counts + 8 + 8 * num_scales
        }
        // Not decodable, so never reached after decode_prefix accepted the packet.
        PacketKind::Ragged | PacketKind::GpuIpcRef => return Ok(()),
    };
    let (body, _) = body_start(buf, h.flags, padded_from)?;
    let pad_from = padded_from + usize::from(h.flags & FLAG_CUST_ALIGN != 0);
    note(
        out,
        path,
        PaddingKind::Body,
        base + pad_from,
        slice(buf, pad_from, body - pad_from)?,
    );
    Ok(())
}

/// Records `region` (at `offset` in the checked buffer) if any of its bytes is non-zero.
fn note(
    out: &mut Vec<NonZeroPadding>,
    path: &[PathStep],
    kind: PaddingKind,
    offset: usize,
    region: &[u8],
) {
    if let Some(first) = region.iter().position(|&b| b != 0) {
        out.push(NonZeroPadding {
            path: path.to_vec(),
            kind,
            offset,
            len: region.len(),
            first_nonzero: offset + first,
            nonzero: region.iter().filter(|&&b| b != 0).count(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode, BodySrc, DType, EncodeOptions, Item};

    fn dense(alignment: usize) -> Vec<u8> {
        let body = [7u8; 12];
        let item = Item::Dense {
            dtype: DType::Float32,
            shape: vec![3],
            body: BodySrc::Bytes(&body),
        };
        let opts = EncodeOptions {
            alignment,
            ..EncodeOptions::default()
        };
        encode(&item, &opts).unwrap()
    }

    #[test]
    fn canonical_packet_reports_nothing() {
        let p = dense(64);
        let r = check_padding(&p, &DecodeOptions::default()).unwrap();
        assert_eq!(r.nonzero, vec![]);
        assert_eq!(r.end, Some(p.len()));
        assert!(r.is_canonical(p.len()));
    }

    #[test]
    fn nonzero_padding_reserved_byte_and_trailing_bytes_are_found() {
        let mut p = dense(64);
        let len = p.len();
        p[20] = 0xaa;
        p[21] = 0xbb;
        p[9] = 2;
        p.extend_from_slice(&[0, 0]);
        let r = check_padding(&p, &DecodeOptions::default()).unwrap();
        assert_eq!(r.end, Some(len));
        assert!(!r.is_canonical(p.len()));
        let kinds: Vec<_> = r
            .nonzero
            .iter()
            .map(|n| (n.kind, n.offset, n.len, n.first_nonzero, n.nonzero))
            .collect();
        // v4 dense f32 shape [3]: header 10 + shape 4 = 14, padding 14..64.
        assert_eq!(
            kinds,
            vec![
                (PaddingKind::Reserved, 9, 1, 9, 1),
                (PaddingKind::Body, 14, 50, 20, 2)
            ]
        );
    }

    #[test]
    fn the_exponent_byte_is_not_padding() {
        let mut p = dense(16);
        // header 10 + shape 4, exponent at 14, padding 15..16
        assert_eq!(p[14], 4);
        let r = check_padding(&p, &DecodeOptions::default()).unwrap();
        assert!(r.nonzero.is_empty());
        p[15] = 1;
        let r = check_padding(&p, &DecodeOptions::default()).unwrap();
        assert_eq!(r.nonzero.len(), 1);
        assert_eq!((r.nonzero[0].offset, r.nonzero[0].len), (15, 1));
    }

    #[test]
    fn invalid_packets_are_errors() {
        let p = dense(64);
        assert!(check_padding(&p[..p.len() - 1], &DecodeOptions::default()).is_err());
        assert!(check_padding(b"TNSO", &DecodeOptions::default()).is_err());
    }
}
