//! Stream framing: how many bytes a packet needs, asked incrementally (FORMAT.md §13 "Streaming").
//!
//! A stream reader calls [`frame`] with the bytes it has; `Need(n)` asks for at least `n` bytes in
//! total before calling again, `Complete(n)` says the packet is `prefix[..n]`. Every `Need` is proven
//! necessary by the bytes already seen (a header before the shape, a length field before the value it
//! delimits), so a reader can grow its buffer as data arrives. Sizes are checked against the decode
//! limits before they are requested.
//!
//! ```text
//! dense      header, shape, [exponent], pad, N·itemsize, [footer]      (compressed: Unframeable)
//! quantized  header, shape, metadata (num_scales), [exponent], pad, codes, [footer]
//! bundle     header, count × (klen u32, key, vlen u32, value)          values are skipped, not parsed
//! sparse     header, shape, 3 × (n u32, packet)
//! string     header, count, [exponent], pad, offsets (C+1)×u64, offsets[C] bytes, [footer]
//! ```

use crate::consts::*;
use crate::decode::DecodeOptions;
use crate::dtype::{DType, QDType, QuantScheme, Version};
use crate::error::FormatError;
use crate::header::{checked_elements, parse_header, read_u32, read_u64, read_u8, PacketKind};

/// The answer of [`frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Read until at least this many bytes are available (always more than the prefix), then call again.
    Need(usize),
    /// The packet is complete: it is `prefix[..n]`.
    Complete(usize),
}

/// Given the first bytes of a packet, says how many bytes it needs in total so far.
///
/// A top-level compressed dense packet has no recorded length and gives [`FormatError::Unframeable`];
/// bundles (even with compressed leaves), sparse, quantized and string packets all frame. The packet
/// contents are not validated beyond what framing needs: decode the complete packet afterwards.
pub fn frame(prefix: &[u8], opts: &DecodeOptions) -> Result<Frame, FormatError> {
    Framer { p: prefix, opts }.run()
}

struct Framer<'a, 'o> {
    p: &'a [u8],
    opts: &'o DecodeOptions,
}

/// Early return of a `Need` when fewer than `n` bytes are present.
macro_rules! need {
    ($s:expr, $n:expr) => {{
        let n: usize = $n;
        if $s.p.len() < n {
            return Ok(Frame::Need(n));
        }
    }};
}

fn sum(parts: &[usize]) -> Result<usize, FormatError> {
    parts
        .iter()
        .try_fold(0usize, |a, &b| a.checked_add(b))
        .ok_or(FormatError::LengthOverflow {
            what: "packet length",
        })
}

fn to_usize(v: u64) -> Result<usize, FormatError> {
    usize::try_from(v).map_err(|_| FormatError::LengthOverflow {
        what: "packet length",
    })
}

impl Framer<'_, '_> {
    fn done(&self, end: usize) -> Result<Frame, FormatError> {
        need!(self, end);
        Ok(Frame::Complete(end))
    }

    fn run(&self) -> Result<Frame, FormatError> {
        need!(self, HEADER_SIZE_V3);
        if self.p[4] == 4 {
            need!(self, HEADER_SIZE_V4);
        }
        let h = parse_header(self.p)?;
        let f = h.flags;
        let hl = h.len();
        let kind = h.kind()?;
        match kind {
            PacketKind::GpuIpcRef => {
                return Err(FormatError::Unsupported {
                    what: "gpu ipc reference packets",
                })
            }
            PacketKind::Ragged => {
                return Err(FormatError::Unsupported {
                    what: "ragged direct framing (FLAG_RAGGED)",
                })
            }
            PacketKind::Bundle => {
                let mut pos = hl;
                for _ in 0..h.count {
                    need!(self, sum(&[pos, 4])?);
                    let klen = read_u32(self.p, pos)? as usize;
                    let vlen_at = sum(&[pos, 4, klen])?;
                    need!(self, sum(&[vlen_at, 4])?);
                    let vlen = read_u32(self.p, vlen_at)? as usize;
                    pos = sum(&[vlen_at, 4, vlen])?;
                }
                return self.done(pos);
            }
            PacketKind::Sparse(_) => {
                let mut pos = hl + 8;
                for _ in 0..3 {
                    need!(self, pos + 4);
                    let n = read_u32(self.p, pos)? as usize;
                    pos = sum(&[pos, 4, n])?;
                }
                return self.done(pos);
            }
            PacketKind::Strings | PacketKind::Quantized | PacketKind::Dense => {}
        }
        let footer = if f & FLAG_INTEGRITY != 0 { 8 } else { 0 };
        if kind == PacketKind::Strings {
            need!(self, hl + 4);
            let count = u64::from(read_u32(self.p, hl)?);
            checked_elements(&[count], self.opts.max_elements)?;
            let b = self.body_start(f, hl + 4)?;
            let b = match b {
                Ok(b) => b,
                Err(need) => return Ok(need),
            };
            let offsets_end = sum(&[b, to_usize((count + 1) * 8)?])?;
            need!(self, offsets_end);
            let total = to_usize(read_u64(self.p, offsets_end - 8)?)?;
            return self.done(sum(&[offsets_end, total, footer])?);
        }
        let ndim = usize::from(h.count);
        if ndim > MAX_NDIM {
            return Err(FormatError::TooManyDims {
                ndim,
                limit: MAX_NDIM,
            });
        }
        let m = hl + 4 * ndim;
        need!(self, m);
        let shape = crate::decode::read_shape(self.p, hl, ndim)?;
        let n = checked_elements(&shape, self.opts.max_elements)?;
        if kind == PacketKind::Quantized {
            let qd = QDType::from_code(h.dtype_code)?;
            let fixed = if h.version == Version::V3 { 9 } else { 10 };
            need!(self, m + fixed);
            let scheme = QuantScheme::from_code(read_u8(self.p, m)?)?;
            let wire_axis = if h.version == Version::V4 {
                Some(read_u8(self.p, m + 1)?)
            } else {
                None
            };
            let group_size = read_u32(self.p, m + fixed - 8)?;
            let ns = read_u32(self.p, m + fixed - 4)?;
            let axis = crate::quant::channel_axis(h.version, scheme, wire_axis, &shape, ns)?;
            if u64::from(ns) != scheme.expected_num_scales(&shape, group_size, usize::from(axis))? {
                return Err(FormatError::BadQuant {
                    reason: "num_scales does not match the scheme and shape",
                });
            }
            let q = sum(&[m, fixed, 8 * ns as usize])?;
            let b = match self.body_start(f, q)? {
                Ok(b) => b,
                Err(need) => return Ok(need),
            };
            return self.done(sum(&[b, qd.packed_len(n), footer])?);
        }
        let dtype = DType::from_code(h.dtype_code)?;
        if f & FLAG_COMPRESSION != 0 {
            return Err(FormatError::Unframeable {
                reason: "a compressed packet does not record its length; frame it externally",
            });
        }
        let b = match self.body_start(f, m)? {
            Ok(b) => b,
            Err(need) => return Ok(need),
        };
        let nbytes = to_usize(
            n.checked_mul(dtype.itemsize() as u64)
                .ok_or(FormatError::LengthOverflow { what: "body" })?,
        )?;
        self.done(sum(&[b, nbytes, footer])?)
    }

    /// The body start after `pos` (the exponent byte position), or the `Need` for the exponent byte.
    fn body_start(&self, flags: u16, pos: usize) -> Result<Result<usize, Frame>, FormatError> {
        if flags & FLAG_CUST_ALIGN != 0 && self.p.len() <= pos {
            return Ok(Err(Frame::Need(pos + 1)));
        }
        crate::decode::body_start(self.p, flags, pos).map(|(b, _)| Ok(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::{encode, BodySrc, EncodeOptions, Item};

    fn steps(bytes: &[u8]) -> Vec<Frame> {
        let opts = DecodeOptions::default();
        let mut have = 0;
        let mut out = Vec::new();
        loop {
            let f = frame(&bytes[..have], &opts).unwrap();
            out.push(f);
            match f {
                Frame::Need(n) => {
                    assert!(n > have);
                    have = n;
                }
                Frame::Complete(n) => {
                    assert_eq!(n, bytes.len());
                    return out;
                }
            }
        }
    }

    #[test]
    fn dense_asks_header_then_total() {
        let body = [0u8; 12];
        let item = Item::Dense {
            dtype: DType::Float32,
            shape: vec![3],
            body: BodySrc::Bytes(&body),
        };
        let p = encode(&item, &EncodeOptions::default()).unwrap();
        assert_eq!(
            steps(&p),
            [
                Frame::Need(8),
                Frame::Need(10),
                Frame::Need(14),
                Frame::Need(76),
                Frame::Complete(76)
            ]
        );
        let p16 = encode(
            &item,
            &EncodeOptions {
                alignment: 16,
                ..EncodeOptions::default()
            },
        )
        .unwrap();
        assert_eq!(
            steps(&p16)[3],
            Frame::Need(15),
            "the exponent byte before the body size"
        );
    }

    #[test]
    fn bundle_asks_entry_by_entry() {
        let leaf = Item::Dense {
            dtype: DType::UInt8,
            shape: vec![1],
            body: BodySrc::Bytes(&[1]),
        };
        let item = Item::Bundle(vec![("ab", leaf.clone()), ("c", leaf)]);
        let p = encode(&item, &EncodeOptions::default()).unwrap();
        let s = steps(&p);
        assert_eq!(
            s[..4],
            [
                Frame::Need(8),
                Frame::Need(10),
                Frame::Need(14),
                Frame::Need(20)
            ]
        );
        assert_eq!(*s.last().unwrap(), Frame::Complete(p.len()));
        // Trailing bytes are not part of the packet.
        let mut more = p.clone();
        more.extend_from_slice(&[0; 5]);
        assert_eq!(
            frame(&more, &DecodeOptions::default()).unwrap(),
            Frame::Complete(p.len())
        );
    }

    #[test]
    fn strings_and_limits() {
        let item = Item::Strings {
            offsets: &[0, 3],
            payload: b"abc",
        };
        let p = encode(&item, &EncodeOptions::default()).unwrap();
        let s = steps(&p);
        assert_eq!(
            s[..4],
            [
                Frame::Need(8),
                Frame::Need(10),
                Frame::Need(14),
                Frame::Need(80)
            ]
        );
        // A header claiming 2^32 elements of float64 is refused rather than asked for.
        let mut big = p[..10].to_vec();
        big[5..9].copy_from_slice(&[1, 0, 3, 2]);
        big.extend_from_slice(&[0xff; 8]);
        assert!(matches!(
            frame(&big, &DecodeOptions::default()),
            Err(FormatError::TooManyElements { .. })
        ));
        assert!(matches!(
            frame(b"XXXXXXXX", &DecodeOptions::default()),
            Err(FormatError::BadMagic { .. })
        ));
    }
}
